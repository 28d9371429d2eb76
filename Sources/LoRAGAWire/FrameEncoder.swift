import NIOCore

/// Writes ``WireMessage``s as frames; use with `MessageToByteHandler`.
///
/// It validates every message first, so a peer never receives a frame this
/// module's decoder would refuse. A shard's payload is copied once into the
/// frame buffer.
public struct FrameEncoder: MessageToByteEncoder, Sendable {
    public typealias OutboundIn = WireMessage

    /// Largest `length` field this encoder produces; match the peer's decoder.
    public let maxFrameLength: Int

    public init(maxFrameLength: Int = WireProtocol.defaultMaxFrameLength) {
        precondition(maxFrameLength >= 1, "maxFrameLength must allow at least the type byte")
        self.maxFrameLength = maxFrameLength
    }

    public func encode(data: WireMessage, out: inout ByteBuffer) throws {
        try data.encodeFrame(into: &out, maxFrameLength: maxFrameLength)
    }
}
