/// Constants of the lora-ga wire protocol, version 5: length-prefixed frames
/// (`length: u32 LE | type: u8 | payload`), little-endian fields, XXH3-64 shard checksums.
/// The frame layout, every message's fields and the conversation are described in the
/// catalog's WireProtocol article (`LoRAGAWire.docc/WireProtocol.md`).
public enum WireProtocol {
    /// The protocol version this module speaks.
    public static let version: UInt16 = 5

    /// Default bound on a frame's `length` field: a 64 MiB shard plus 64 KiB of headers.
    public static let defaultMaxFrameLength = (64 << 20) + (64 << 10)

    /// Size of the `length` prefix.
    public static let lengthFieldBytes = 4

    /// Largest layer name in bytes of UTF-8.
    public static let maxLayerNameBytes = 1024
    /// Largest worker or job id in bytes of UTF-8.
    public static let maxIDBytes = 256
    /// Largest path or free-text field (error message, goodbye reason) in bytes of UTF-8.
    public static let maxTextBytes = 4096
}

/// The type byte of a frame.
public enum WireMessageType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case hello = 1
    case challenge = 2
    case jobSpec = 3
    case announce = 4
    case layerBegin = 5
    case shard = 6
    case layerCommit = 7
    case layerDone = 8
    case powerRequest = 9
    case powerReply = 10
    case error = 11
    case jobDone = 12
    case goodbye = 13

    public var description: String {
        switch self {
        case .hello: "Hello"
        case .challenge: "Challenge"
        case .jobSpec: "JobSpec"
        case .announce: "Announce"
        case .layerBegin: "LayerBegin"
        case .shard: "Shard"
        case .layerCommit: "LayerCommit"
        case .layerDone: "LayerDone"
        case .powerRequest: "PowerRequest"
        case .powerReply: "PowerReply"
        case .error: "ErrorMessage"
        case .jobDone: "JobDone"
        case .goodbye: "Goodbye"
        }
    }
}
