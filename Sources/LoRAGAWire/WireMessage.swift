import NIOCore

/// One message's payload: a value type that writes and parses itself.
public protocol WireMessageBody: Sendable, Equatable {
    /// The frame's type byte.
    static var messageType: WireMessageType { get }

    /// Checks the structural rules (string limits, enum ranges, byte counts
    /// against shapes). Every decoded message passes; `FrameEncoder` refuses
    /// messages that do not.
    func validate() throws(WireError)

    /// Appends the payload (no length, no type byte). Requires a valid message.
    func encode(into buffer: inout ByteBuffer)

    /// Parses a payload that fills `buffer`'s readable bytes exactly, and validates it.
    /// On success the readable bytes are consumed; payload fields of type
    /// `ByteBuffer` are slices of `buffer` (no copy).
    init(from buffer: inout ByteBuffer) throws(WireError)
}

/// Any message of the protocol.
public enum WireMessage: Sendable, Equatable {
    case hello(Hello)
    case challenge(Challenge)
    case jobSpec(JobSpec)
    case announce(Announce)
    case layerBegin(LayerBegin)
    case shard(Shard)
    case layerCommit(LayerCommit)
    case layerDone(LayerDone)
    case powerRequest(PowerRequest)
    case powerReply(PowerReply)
    case error(ErrorMessage)
    case jobDone(JobDone)
    case goodbye(Goodbye)

    public var type: WireMessageType {
        Swift.type(of: body).messageType
    }

    /// The payload struct, for code that treats messages alike.
    public var body: any WireMessageBody {
        switch self {
        case .hello(let m): m
        case .challenge(let m): m
        case .jobSpec(let m): m
        case .announce(let m): m
        case .layerBegin(let m): m
        case .shard(let m): m
        case .layerCommit(let m): m
        case .layerDone(let m): m
        case .powerRequest(let m): m
        case .powerReply(let m): m
        case .error(let m): m
        case .jobDone(let m): m
        case .goodbye(let m): m
        }
    }

    /// Parses a payload of the given type (see ``WireMessageBody/init(from:)``).
    public init(type: WireMessageType, payload: inout ByteBuffer) throws(WireError) {
        switch type {
        case .hello: self = .hello(try Hello(from: &payload))
        case .challenge: self = .challenge(try Challenge(from: &payload))
        case .jobSpec: self = .jobSpec(try JobSpec(from: &payload))
        case .announce: self = .announce(try Announce(from: &payload))
        case .layerBegin: self = .layerBegin(try LayerBegin(from: &payload))
        case .shard: self = .shard(try Shard(from: &payload))
        case .layerCommit: self = .layerCommit(try LayerCommit(from: &payload))
        case .layerDone: self = .layerDone(try LayerDone(from: &payload))
        case .powerRequest: self = .powerRequest(try PowerRequest(from: &payload))
        case .powerReply: self = .powerReply(try PowerReply(from: &payload))
        case .error: self = .error(try ErrorMessage(from: &payload))
        case .jobDone: self = .jobDone(try JobDone(from: &payload))
        case .goodbye: self = .goodbye(try Goodbye(from: &payload))
        }
    }

    public func validate() throws(WireError) {
        try body.validate()
    }

    /// Appends the payload only (no length, no type byte). Requires a valid message.
    public func encodePayload(into buffer: inout ByteBuffer) {
        body.encode(into: &buffer)
    }

    /// Payload size known before encoding, for the messages that carry bulk data; 0 for the rest.
    var bulkPayloadBytes: Int {
        switch self {
        case .shard(let m): Shard.headerBytes + m.payload.readableBytes
        case .powerRequest(let m): PowerRequest.headerBytes + m.payload.readableBytes
        case .powerReply(let m): PowerReply.headerBytes + m.payload.readableBytes
        default: 0
        }
    }

    /// Validates, then appends a whole frame: length, type byte, payload.
    /// Nothing is appended when it throws.
    public func encodeFrame(
        into buffer: inout ByteBuffer,
        maxFrameLength: Int = WireProtocol.defaultMaxFrameLength
    ) throws(WireError) {
        try validate()
        let bulk = bulkPayloadBytes
        // Refuse an oversized shard before copying it.
        if bulk + 1 > maxFrameLength {
            throw .frameTooLarge(length: bulk + 1, max: maxFrameLength)
        }
        let start = buffer.writerIndex
        // One allocation for a shard's whole frame.
        buffer.reserveCapacity(minimumWritableBytes: WireProtocol.lengthFieldBytes + 1 + bulk)
        buffer.writeInteger(UInt32(0), endianness: .little)  // patched below
        buffer.writeInteger(type.rawValue)
        encodePayload(into: &buffer)
        let length = buffer.writerIndex - start - WireProtocol.lengthFieldBytes
        guard length <= maxFrameLength, length <= Int(UInt32.max) else {
            buffer.moveWriterIndex(to: start)
            throw .frameTooLarge(length: length, max: maxFrameLength)
        }
        buffer.setInteger(UInt32(length), at: start, endianness: .little)
    }
}
