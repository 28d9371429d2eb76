import NIOCore

/// What the coordinator's decoder hands on: whole messages, and uncompressed shards piece
/// by piece as their rows arrive.
public enum InboundFrame: Sendable, Equatable {
    case message(WireMessage)
    case shardPiece(ShardPiece)
}

/// Consecutive bytes of an uncompressed shard's payload, in arrival order.
public struct ShardPiece: Sendable, Equatable {
    /// The shard's fields (validated; its `payload` is empty).
    public var shard: Shard
    /// Payload bytes before `bytes`.
    public var offset: Int
    /// A slice of the received data.
    public var bytes: ByteBuffer
    /// On the last piece: whether the shard's payload hashed to its declared `checksum`
    /// (hashed piece by piece by the decoder, right after each read). Nil on other pieces.
    public var checksumMatches: Bool?

    public init(shard: Shard, offset: Int, bytes: ByteBuffer, checksumMatches: Bool? = nil) {
        self.shard = shard
        self.offset = offset
        self.bytes = bytes
        self.checksumMatches = checksumMatches
    }

    public var payloadBytes: Int { Int(shard.uncompressedBytes) }
    public var isFirst: Bool { offset == 0 }
    public var isLast: Bool { offset + bytes.readableBytes == payloadBytes }
}

/// ``FrameDecoder`` for the coordinator: an uncompressed shard is passed on in pieces, each
/// a slice of the bytes as received, instead of being assembled into one 4 MB frame first
/// (`ByteToMessageHandler` assembles a frame by copying every received chunk into it). Every
/// other frame (compressed shards too) is decoded whole, with the same checks and bounds.
///
/// Each piece is hashed here, on the thread that has just read it from the socket, while the
/// bytes are in that core's cache; hashed later on the engine's thread they would come from
/// memory at half the speed.
public struct StreamingFrameDecoder: NIOSingleStepByteToMessageDecoder, Sendable {
    public typealias InboundOut = InboundFrame

    private var frames: FrameDecoder
    /// The shard whose rows are arriving, how many of its payload bytes have, and their hash.
    private var open: (shard: Shard, received: Int, checksum: ShardChecksum)?
    /// Closed until the peer's Hello is accepted: only a small Hello may arrive before.
    private let gate: HandshakeGate

    public init(maxFrameLength: Int = WireProtocol.defaultMaxFrameLength, gate: HandshakeGate = HandshakeGate(open: true)) {
        frames = FrameDecoder(maxFrameLength: maxFrameLength)
        self.gate = gate
    }

    public mutating func decode(buffer: inout ByteBuffer) throws(WireError) -> InboundFrame? {
        if let (shard, received, hashed) = open {
            var checksum = hashed
            let count = Swift.min(buffer.readableBytes, Int(shard.uncompressedBytes) - received)
            guard count > 0 else { return nil }
            var piece = ShardPiece(shard: shard, offset: received, bytes: buffer.readSlice(length: count)!)
            checksum.update(piece.bytes)
            if received + count < Int(shard.uncompressedBytes) {
                open = (shard, received + count, checksum)
            } else {
                piece.checksumMatches = checksum.value == shard.checksum
                open = nil
            }
            return .shardPiece(piece)
        }
        let handshaking = !gate.isOpen
        if handshaking, let length = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self),
           Int(length) > HandshakeGate.handshakeMaxFrameLength {
            throw .frameTooLarge(length: Int(length), max: HandshakeGate.handshakeMaxFrameLength)
        }
        guard let (length, type) = try frames.peekFrame(buffer) else { return nil }
        if handshaking {
            guard type == .hello else { throw .malformed(type, "only Hello may arrive before the handshake") }
        }
        let head = WireProtocol.lengthFieldBytes + 1
        if type == .shard, var fields = buffer.getSlice(at: buffer.readerIndex + head, length: Swift.min(Shard.headerBytes, length - 1)),
           fields.readableBytes == Shard.headerBytes {
            let shard = try Shard(fieldsFrom: &fields)
            if shard.compression == .uncompressed {
                try shard.validateFields()
                guard length == 1 + Shard.headerBytes + Int(shard.uncompressedBytes) else {
                    throw .malformed(.shard, "frame of \(length) bytes, a \(shard.rowCount)×\(shard.cols) \(shard.dtype) shard needs \(1 + Shard.headerBytes + Int(shard.uncompressedBytes))")
                }
                buffer.moveReaderIndex(forwardBy: head + Shard.headerBytes)
                open = (shard, 0, ShardChecksum())
                return try decode(buffer: &buffer)
            }
        }
        return try frames.decode(buffer: &buffer).map(InboundFrame.message)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws(WireError) -> InboundFrame? {
        if let frame = try decode(buffer: &buffer) {
            return frame
        }
        if seenEOF && (open != nil || buffer.readableBytes > 0) {
            throw .truncatedFrame(bufferedBytes: buffer.readableBytes)
        }
        return nil
    }
}
