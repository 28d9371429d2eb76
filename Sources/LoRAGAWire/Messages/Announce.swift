import LoRAGACore
import NIOCore

/// One layer a worker holds a gradient for.
public struct LayerInfo: Hashable, Sendable {
    public var name: String
    /// The gradient's `out` dimension (PyTorch orientation).
    public var rows: UInt64
    /// The gradient's `in` dimension.
    public var cols: UInt64
    /// The dtype the worker reads from disk (may be F64; it sends `JobSpec.payloadDType`).
    public var sourceDType: TensorDType
    /// The blocks of the layer this worker holds, when its files declare blocks; empty when it
    /// holds whole layers (a data-parallel partial sum). Blocks of all workers must cover the layer.
    public var regions: [LayerRegion]

    public init(name: String, rows: UInt64, cols: UInt64, sourceDType: TensorDType, regions: [LayerRegion] = []) {
        self.name = name
        self.rows = rows
        self.cols = cols
        self.sourceDType = sourceDType
        self.regions = regions
    }

    /// Most blocks one worker may declare for one layer.
    public static let maxRegions = 1 << 16

    /// Smallest encoding: u16 name length, 1 name byte, rows, cols, dtype, region count.
    static let minEncodedBytes = 2 + 1 + 8 + 8 + 1 + 4
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
            guard layer.regions.count <= LayerInfo.maxRegions else {
                throw .malformed(Self.messageType, "layer \(layer.name) declares \(layer.regions.count) blocks, at most \(LayerInfo.maxRegions)")
            }
            for region in layer.regions where region.isEmpty || region.rows.upperBound > Int(layer.rows) || region.cols.upperBound > Int(layer.cols) {
                throw .malformed(Self.messageType, "layer \(layer.name): block \(region) is empty or outside \(layer.rows)×\(layer.cols)")
            }
        }
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(UInt32(layers.count))
        for layer in layers {
            buffer.writeWireString(layer.name)
            buffer.writeLittleEndian(layer.rows)
            buffer.writeLittleEndian(layer.cols)
            buffer.writeLittleEndian(layer.sourceDType.wireCode)
            buffer.writeLittleEndian(UInt32(layer.regions.count))
            for region in layer.regions {
                for value in [region.rows.lowerBound, region.rows.upperBound, region.cols.lowerBound, region.cols.upperBound] {
                    buffer.writeLittleEndian(UInt64(value))
                }
            }
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
            let sourceDType = try reader.enumeration("sourceDType", as: TensorDType.self)
            let regionCount = try reader.count("block count", minElementBytes: 32)
            var regions: [LayerRegion] = []
            for _ in 0..<regionCount {
                var bounds: [Int] = []
                for field: StaticString in ["row start", "row end", "column start", "column end"] {
                    let value = try reader.integer(field, as: UInt64.self)
                    guard value <= UInt64(Int32.max) * 64 else { throw .malformed(Self.messageType, "layer \(name): block \(field) \(value) is out of range") }
                    bounds.append(Int(value))
                }
                guard bounds[0] <= bounds[1], bounds[2] <= bounds[3] else {
                    throw .malformed(Self.messageType, "layer \(name): block rows \(bounds[0])..\(bounds[1]), columns \(bounds[2])..\(bounds[3]) are reversed")
                }
                regions.append(LayerRegion(rows: bounds[0]..<bounds[1], cols: bounds[2]..<bounds[3]))
            }
            layers.append(LayerInfo(name: name, rows: rows, cols: cols, sourceDType: sourceDType, regions: regions))
        }
        try reader.finish()
        buffer = reader.buffer
        self.init(layers: layers)
        try validate()
    }
}
