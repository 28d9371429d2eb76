/// Why a frame could not be decoded or a message could not be encoded.
///
/// Every failure of the codec is one of these; a connection that sees one
/// should send `ErrorMessage(badData)` if it can and close.
public enum WireError: Error, Equatable, Hashable, Sendable, CustomStringConvertible {
    /// The frame's `length` field exceeds the receiver's (or encoder's) limit.
    case frameTooLarge(length: Int, max: Int)
    /// The frame's `length` field is 0 (there must be at least a type byte).
    case emptyFrame
    /// The frame's type byte names no message of this protocol version.
    case unknownMessageType(UInt8)
    /// The payload does not parse exactly, or a message breaks a structural rule.
    case malformed(WireMessageType, String)
    /// The stream ended in the middle of a frame.
    case truncatedFrame(bufferedBytes: Int)

    public var description: String {
        switch self {
        case .frameTooLarge(let length, let max):
            "frame of \(length) bytes exceeds the limit of \(max) bytes"
        case .emptyFrame:
            "frame with length 0"
        case .unknownMessageType(let type):
            "unknown message type \(type)"
        case .malformed(let type, let reason):
            "malformed \(type): \(reason)"
        case .truncatedFrame(let bufferedBytes):
            "stream ended inside a frame (\(bufferedBytes) bytes buffered)"
        }
    }
}
