import NIOConcurrencyHelpers

/// Whether a connection has completed the handshake, shared by its decoder (on the event
/// loop) and the coordinator (which opens it once the peer's Hello is accepted).
///
/// Until then the decoder accepts only a Hello of at most ``handshakeMaxFrameLength`` bytes,
/// so an unauthenticated peer can make the coordinator buffer a few KB, not a 64 MiB frame.
public final class HandshakeGate: Sendable {
    /// Largest frame before the handshake: a Hello (version, a worker id, nonces, a proof).
    public static let handshakeMaxFrameLength = 4 << 10
    private let state = NIOLockedValueBox(false)

    public init(open: Bool = false) {
        state.withLockedValue { $0 = open }
    }

    public var isOpen: Bool { state.withLockedValue { $0 } }

    public func open() {
        state.withLockedValue { $0 = true }
    }
}
