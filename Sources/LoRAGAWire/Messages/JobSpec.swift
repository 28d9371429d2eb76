import LoRAGACore
import NIOCore

/// Type 3, coordinator → worker: the job a worker has joined.
public struct JobSpec: WireMessageBody {
    public static let messageType = WireMessageType.jobSpec

    public var protocolVersion: UInt16
    public var jobID: String
    public var mode: SVDMode
    public var rank: UInt32
    /// k = 2r + oversampling.
    public var sketchWidth: UInt32
    /// Seeds the counter-based test matrices.
    public var seed: UInt64
    public var powerIterations: UInt32
    public var rowsPerShard: UInt32
    /// F32, BF16 or F16.
    public var payloadDType: TensorDType
    public var compression: WireCompression
    /// Layers already finished (e.g. by a coordinator before its restart).
    public var skipLayers: [String]

    public init(
        protocolVersion: UInt16 = WireProtocol.version,
        jobID: String,
        mode: SVDMode,
        rank: UInt32,
        sketchWidth: UInt32,
        seed: UInt64,
        powerIterations: UInt32,
        rowsPerShard: UInt32,
        payloadDType: TensorDType,
        compression: WireCompression,
        skipLayers: [String] = []
    ) {
        self.protocolVersion = protocolVersion
        self.jobID = jobID
        self.mode = mode
        self.rank = rank
        self.sketchWidth = sketchWidth
        self.seed = seed
        self.powerIterations = powerIterations
        self.rowsPerShard = rowsPerShard
        self.payloadDType = payloadDType
        self.compression = compression
        self.skipLayers = skipLayers
    }

    public func validate() throws(WireError) {
        try FieldRule.name(jobID, "jobID", maxBytes: WireProtocol.maxIDBytes, in: Self.messageType)
        guard payloadDType.isPayloadType else {
            throw .malformed(Self.messageType, "payloadDType \(payloadDType) cannot carry gradients")
        }
        guard skipLayers.count <= Int(UInt32.max) else {
            throw .malformed(Self.messageType, "\(skipLayers.count) skipLayers do not fit a u32 count")
        }
        for name in skipLayers {
            try FieldRule.name(name, "skipLayers name", maxBytes: WireProtocol.maxLayerNameBytes, in: Self.messageType)
        }
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(protocolVersion)
        buffer.writeWireString(jobID)
        buffer.writeLittleEndian(mode.wireCode)
        buffer.writeLittleEndian(rank)
        buffer.writeLittleEndian(sketchWidth)
        buffer.writeLittleEndian(seed)
        buffer.writeLittleEndian(powerIterations)
        buffer.writeLittleEndian(rowsPerShard)
        buffer.writeLittleEndian(payloadDType.wireCode)
        buffer.writeLittleEndian(compression.rawValue)
        buffer.writeLittleEndian(UInt32(skipLayers.count))
        for name in skipLayers {
            buffer.writeWireString(name)
        }
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let protocolVersion = try reader.integer("protocolVersion", as: UInt16.self)
        let jobID = try reader.string("jobID", maxBytes: WireProtocol.maxIDBytes)
        let mode = try reader.enumeration("mode", as: SVDMode.self)
        let rank = try reader.integer("rank", as: UInt32.self)
        let sketchWidth = try reader.integer("sketchWidth", as: UInt32.self)
        let seed = try reader.integer("seed", as: UInt64.self)
        let powerIterations = try reader.integer("powerIterations", as: UInt32.self)
        let rowsPerShard = try reader.integer("rowsPerShard", as: UInt32.self)
        let payloadDType = try reader.enumeration("payloadDType", as: TensorDType.self)
        let compression = try reader.enumeration("compression", as: WireCompression.self)
        let count = try reader.count("skipLayers count", minElementBytes: 2)
        var skipLayers: [String] = []
        skipLayers.reserveCapacity(count)
        for _ in 0..<count {
            skipLayers.append(try reader.string("skipLayers name", maxBytes: WireProtocol.maxLayerNameBytes))
        }
        try reader.finish()
        buffer = reader.buffer
        self.init(
            protocolVersion: protocolVersion, jobID: jobID, mode: mode, rank: rank, sketchWidth: sketchWidth,
            seed: seed, powerIterations: powerIterations, rowsPerShard: rowsPerShard,
            payloadDType: payloadDType, compression: compression, skipLayers: skipLayers
        )
        try validate()
    }
}
