import LoRAGACore

/// One tensor entry of a safetensors header, after validation.
public struct TensorInfo: Sendable, Hashable {
    /// Key in the header, e.g. `encoder.layer.0.attention.self.query.weight`.
    public let name: String
    public let dtype: TensorDType
    /// Dimensions, outermost first (PyTorch order: a linear weight is `[out, in]`).
    public let shape: [Int]
    /// `data_offsets` as in the header: byte range relative to the data section.
    public let dataOffsets: Range<Int>

    /// Number of elements, the product of `shape` (1 for a scalar).
    public var elementCount: Int { shape.reduce(1, *) }

    /// Size of the first dimension: what `readRows` calls rows (a scalar has one).
    public var rowCount: Int { shape.first ?? 1 }

    /// Elements per row: the product of all dimensions after the first.
    public var columnCount: Int { shape.dropFirst().reduce(1, *) }

    public init(name: String, dtype: TensorDType, shape: [Int], dataOffsets: Range<Int>) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.dataOffsets = dataOffsets
    }
}
