/// Element type of a tensor on the wire (u8).
public enum WireDType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case f32 = 0
    case bf16 = 1
    case f16 = 2
    /// Only as `LayerInfo.sourceDType`: gradients travel as F32, BF16 or F16.
    case f64 = 3

    /// Bytes per element.
    public var byteWidth: Int {
        switch self {
        case .f32: 4
        case .bf16, .f16: 2
        case .f64: 8
        }
    }

    /// Whether shard payloads may use this type.
    public var isPayloadType: Bool { self != .f64 }

    public var description: String {
        switch self {
        case .f32: "F32"
        case .bf16: "BF16"
        case .f16: "F16"
        case .f64: "F64"
        }
    }
}

/// How a shard payload is compressed (u8).
public enum WireCompression: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// Raw little-endian elements.
    case uncompressed = 0
    /// Elements byte-shuffled (all first bytes, then all second bytes, …), then one zstd frame.
    case zstdShuffled = 1

    public var description: String {
        switch self {
        case .uncompressed: "none"
        case .zstdShuffled: "zstd-shuffled"
        }
    }
}

/// Bytes taken by a `rows × cols` matrix of `dtype`, or `nil` when a count is
/// negative or the product does not fit in `Int`.
public func payloadByteCount<Rows: BinaryInteger, Cols: BinaryInteger>(
    rows: Rows,
    cols: Cols,
    dtype: WireDType
) -> Int? {
    guard let rows = UInt64(exactly: rows), let cols = UInt64(exactly: cols) else { return nil }
    let (elements, overflow1) = rows.multipliedReportingOverflow(by: cols)
    let (bytes, overflow2) = elements.multipliedReportingOverflow(by: UInt64(dtype.byteWidth))
    guard !overflow1, !overflow2 else { return nil }
    return Int(exactly: bytes)
}
