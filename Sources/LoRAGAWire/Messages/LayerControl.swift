import NIOCore

/// Type 5, coordinator → worker: send this layer (dense, sketch) or get ready for its power rounds.
public struct LayerBegin: WireMessageBody {
    public static let messageType = WireMessageType.layerBegin

    public var layerIndex: UInt32
    /// Which try at this layer: a layer restarted after a worker dropped mid-layer gets a new
    /// attempt, and shards or commits of an older attempt are discarded.
    public var attempt: UInt32
    public var name: String

    public init(layerIndex: UInt32, name: String, attempt: UInt32 = 0) {
        self.layerIndex = layerIndex
        self.attempt = attempt
        self.name = name
    }

    public func validate() throws(WireError) {
        try FieldRule.name(name, "name", maxBytes: WireProtocol.maxLayerNameBytes, in: Self.messageType)
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(layerIndex)
        buffer.writeLittleEndian(attempt)
        buffer.writeWireString(name)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let layerIndex = try reader.integer("layerIndex", as: UInt32.self)
        let attempt = try reader.integer("attempt", as: UInt32.self)
        let name = try reader.string("name", maxBytes: WireProtocol.maxLayerNameBytes)
        try reader.finish()
        buffer = reader.buffer
        self.init(layerIndex: layerIndex, name: name, attempt: attempt)
        try validate()
    }
}

/// Type 7, worker → coordinator: every shard of the layer has been sent; count it now.
public struct LayerCommit: WireMessageBody {
    public static let messageType = WireMessageType.layerCommit

    public var layerIndex: UInt32
    /// The attempt of the `LayerBegin` this commit answers.
    public var attempt: UInt32
    public var shardCount: UInt32
    public var rowCount: UInt64
    /// ``ShardChecksum`` (XXH3-64) over the layer's shard checksums (u64 LE each), in send order.
    public var checksum: UInt64

    public init(layerIndex: UInt32, shardCount: UInt32, rowCount: UInt64, checksum: UInt64, attempt: UInt32 = 0) {
        self.layerIndex = layerIndex
        self.attempt = attempt
        self.shardCount = shardCount
        self.rowCount = rowCount
        self.checksum = checksum
    }

    public func validate() throws(WireError) {}

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(layerIndex)
        buffer.writeLittleEndian(attempt)
        buffer.writeLittleEndian(shardCount)
        buffer.writeLittleEndian(rowCount)
        buffer.writeLittleEndian(checksum)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let layerIndex = try reader.integer("layerIndex", as: UInt32.self)
        let attempt = try reader.integer("attempt", as: UInt32.self)
        let shardCount = try reader.integer("shardCount", as: UInt32.self)
        let rowCount = try reader.integer("rowCount", as: UInt64.self)
        let checksum = try reader.integer("checksum", as: UInt64.self)
        try reader.finish()
        buffer = reader.buffer
        self.init(layerIndex: layerIndex, shardCount: shardCount, rowCount: rowCount, checksum: checksum, attempt: attempt)
    }
}

/// Type 8, coordinator → worker: the layer is final and durable; the worker may free it.
public struct LayerDone: WireMessageBody {
    public static let messageType = WireMessageType.layerDone

    public var layerIndex: UInt32

    public init(layerIndex: UInt32) {
        self.layerIndex = layerIndex
    }

    public func validate() throws(WireError) {}

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(layerIndex)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let layerIndex = try reader.integer("layerIndex", as: UInt32.self)
        try reader.finish()
        buffer = reader.buffer
        self.init(layerIndex: layerIndex)
    }
}
