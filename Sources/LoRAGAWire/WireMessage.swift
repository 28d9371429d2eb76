import NIOCore

/// One message's payload: a value type that writes and parses itself.
public protocol WireMessageBody: Sendable, Equatable {
    /// The frame's type byte.
    static var messageType: WireMessageType { get }

    /// Checks the structural rules (string limits, enum ranges, byte counts
    /// against shapes). Every decoded message passes; `FrameWriter` refuses
    /// messages that do not.
    func validate() throws(WireError)

    /// Appends the payload (no length, no type byte). Requires a valid message.
    func encode(into buffer: inout ByteBuffer)

    /// Bulk bytes that end the payload (a shard's rows, a power matrix): a writer sends them
    /// as they are after the fields instead of copying them — from a file region with
    /// `sendfile` when they are a file's bytes. Nil for the other messages.
    var trailingBulk: IOData? { get }

    /// Appends the payload up to `trailingBulk` (all of it when that is nil).
    func encodeFields(into buffer: inout ByteBuffer)

    /// Parses a payload that fills `buffer`'s readable bytes exactly, and validates it.
    /// On success the readable bytes are consumed; payload fields of type
    /// `ByteBuffer` are slices of `buffer` (no copy).
    init(from buffer: inout ByteBuffer) throws(WireError)
}

extension WireMessageBody {
    public var trailingBulk: IOData? { nil }
    public func encodeFields(into buffer: inout ByteBuffer) { encode(into: &buffer) }
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

    /// Validates, then appends a frame's length, type byte and fields to `head`, and returns
    /// the bulk bytes that complete the frame (nil when `head` holds all of it). A writer
    /// sends the two back to back; the bulk bytes are never copied. Nothing is appended when
    /// it throws (an invalid message, or a frame longer than `maxFrameLength`).
    public func encodeFrameHead(
        into head: inout ByteBuffer,
        maxFrameLength: Int = WireProtocol.defaultMaxFrameLength
    ) throws(WireError) -> IOData? {
        try validate()
        let bulk = body.trailingBulk
        let start = head.writerIndex
        head.writeInteger(UInt32(0), endianness: .little)  // patched below
        head.writeInteger(type.rawValue)
        body.encodeFields(into: &head)
        let length = head.writerIndex - start - WireProtocol.lengthFieldBytes + (bulk?.readableBytes ?? 0)
        guard length <= maxFrameLength, length <= Int(UInt32.max) else {
            head.moveWriterIndex(to: start)
            throw .frameTooLarge(length: length, max: maxFrameLength)
        }
        head.setInteger(UInt32(length), at: start, endianness: .little)
        return bulk
    }

    /// Validates, then appends a whole frame: length, type byte, payload.
    /// Nothing is appended when it throws.
    public func encodeFrame(
        into buffer: inout ByteBuffer,
        maxFrameLength: Int = WireProtocol.defaultMaxFrameLength
    ) throws(WireError) {
        if let bulk = body.trailingBulk {
            // One allocation for the whole frame (the fields before the bulk are a few dozen bytes).
            buffer.reserveCapacity(minimumWritableBytes: WireProtocol.lengthFieldBytes + 1 + Shard.headerBytes + bulk.readableBytes)
        }
        switch try encodeFrameHead(into: &buffer, maxFrameLength: maxFrameLength) {
        case .byteBuffer(var bulk)?: buffer.writeBuffer(&bulk)
        case .fileRegion?: preconditionFailure("a shard sent from a file region is written by FrameWriter (sendfile); encodeFrame does not read files")
        case nil: break
        }
    }
}
