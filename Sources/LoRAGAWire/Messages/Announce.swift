import NIOCore

/// One layer a worker holds a gradient for.
public struct LayerInfo: Hashable, Sendable {
    public var name: String
    /// The gradient's `out` dimension (PyTorch orientation).
    public var rows: UInt64
    /// The gradient's `in` dimension.
    public var cols: UInt64
    /// The dtype the worker reads from disk (may be F64; it sends `JobSpec.payloadDType`).
    public var sourceDType: WireDType

    public init(name: String, rows: UInt64, cols: UInt64, sourceDType: WireDType) {
        self.name = name
        self.rows = rows
        self.cols = cols
        self.sourceDType = sourceDType
    }

    /// Smallest encoding: u16 name length, 1 name byte, rows, cols, dtype.
    static let minEncodedBytes = 2 + 1 + 8 + 8 + 1
}

/// Type 4, worker → coordinator: the layers (in the worker's manifest order) and their shapes.
public struct Announce: WireMessageBody {
    public static let messageType = WireMessageType.announce

    public var layers: [LayerInfo]

    public init(layers: [LayerInfo]) {
        self.layers = layers
    }

    public func validate() throws(WireError) {
        guard layers.count <= Int(UInt32.max) else {
            throw .malformed(Self.messageType, "\(layers.count) layers do not fit a u32 count")
        }
        for layer in layers {
            try FieldRule.name(layer.name, "layer name", maxBytes: WireProtocol.maxLayerNameBytes, in: Self.messageType)
            guard layer.rows > 0, layer.cols > 0 else {
                throw .malformed(Self.messageType, "layer \(layer.name) has shape \(layer.rows)×\(layer.cols)")
            }
        }
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(UInt32(layers.count))
        for layer in layers {
            buffer.writeWireString(layer.name)
            buffer.writeLittleEndian(layer.rows)
            buffer.writeLittleEndian(layer.cols)
            buffer.writeLittleEndian(layer.sourceDType.rawValue)
        }
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let count = try reader.count("layers count", minElementBytes: LayerInfo.minEncodedBytes)
        var layers: [LayerInfo] = []
        layers.reserveCapacity(count)
        for _ in 0..<count {
            let name = try reader.string("layer name", maxBytes: WireProtocol.maxLayerNameBytes)
            let rows = try reader.integer("rows", as: UInt64.self)
            let cols = try reader.integer("cols", as: UInt64.self)
            let sourceDType = try reader.enumeration("sourceDType", as: WireDType.self)
            layers.append(LayerInfo(name: name, rows: rows, cols: cols, sourceDType: sourceDType))
        }
        try reader.finish()
        buffer = reader.buffer
        self.init(layers: layers)
        try validate()
    }
}
