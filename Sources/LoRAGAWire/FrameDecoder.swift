import NIOCore

/// Cuts the inbound byte stream into frames and parses them into ``WireMessage``s.
///
/// Untrusted input is bounded before it costs memory: the length is checked
/// as soon as its four bytes are readable, the type byte as soon as it is,
/// and only then does the decoder wait for (and the `ByteToMessageHandler`
/// buffer) the payload. Decoded shard and power payloads are slices of the
/// received bytes.
public struct FrameDecoder: NIOSingleStepByteToMessageDecoder, Sendable {
    public typealias InboundOut = WireMessage

    /// Largest accepted `length` field (type byte + payload).
    public let maxFrameLength: Int

    public init(maxFrameLength: Int = WireProtocol.defaultMaxFrameLength) {
        precondition(maxFrameLength >= 1, "maxFrameLength must allow at least the type byte")
        self.maxFrameLength = maxFrameLength
    }

    public mutating func decode(buffer: inout ByteBuffer) throws(WireError) -> WireMessage? {
        guard let (length, type) = try peekFrame(buffer),
              buffer.readableBytes >= WireProtocol.lengthFieldBytes + length else {
            return nil
        }
        buffer.moveReaderIndex(forwardBy: WireProtocol.lengthFieldBytes + 1)
        var payload = buffer.readSlice(length: length - 1)!
        return try WireMessage(type: type, payload: &payload)
    }

    /// The length and type of the frame at the reader index, checked as soon as their bytes
    /// are readable (nil until they are); nothing is consumed.
    func peekFrame(_ buffer: ByteBuffer) throws(WireError) -> (length: Int, type: WireMessageType)? {
        let start = buffer.readerIndex
        guard let rawLength = buffer.getInteger(at: start, endianness: .little, as: UInt32.self) else {
            return nil
        }
        let length = Int(rawLength)
        guard length > 0 else { throw .emptyFrame }
        guard length <= maxFrameLength else {
            throw .frameTooLarge(length: length, max: maxFrameLength)
        }
        guard let typeByte = buffer.getInteger(at: start + WireProtocol.lengthFieldBytes, as: UInt8.self) else {
            return nil
        }
        guard let type = WireMessageType(rawValue: typeByte) else {
            throw .unknownMessageType(typeByte)
        }
        return (length, type)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws(WireError) -> WireMessage? {
        if let message = try decode(buffer: &buffer) {
            return message
        }
        if seenEOF && buffer.readableBytes > 0 {
            throw .truncatedFrame(bufferedBytes: buffer.readableBytes)
        }
        return nil
    }
}
