import LoRAGACore

/// A vocabulary enum of LoRAGACore that travels as one byte; its codes are defined beside
/// the enum (`TensorDType.wireCode`, `SVDMode.wireCode`) so no field has a second spelling.
protocol WireCoded {
    var wireCode: UInt8 { get }
    init?(wireCode: UInt8)
}

extension TensorDType: WireCoded {}
extension SVDMode: WireCoded {}

extension TensorDType {
    /// Whether shard payloads may use this type: gradients travel as F32, BF16 or F16; F64
    /// only describes a worker's source files (`LayerInfo.sourceDType`).
    public var isPayloadType: Bool { isWritableFromFloat }
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
    dtype: TensorDType
) -> Int? {
    guard let rows = UInt64(exactly: rows), let cols = UInt64(exactly: cols) else { return nil }
    let (elements, overflow1) = rows.multipliedReportingOverflow(by: cols)
    let (bytes, overflow2) = elements.multipliedReportingOverflow(by: UInt64(dtype.byteSize))
    guard !overflow1, !overflow2 else { return nil }
    return Int(exactly: bytes)
}
