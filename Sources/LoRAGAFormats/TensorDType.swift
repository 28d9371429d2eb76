/// Element type of a safetensors tensor, spelled as in the file's header.
///
/// Every dtype of the safetensors specification is listed so a file that mixes
/// float gradients with, say, an `I64` step counter still opens; only the
/// floating-point ones can be read as `Float` (see `isReadableAsFloat`).
public enum TensorDType: String, Sendable, CaseIterable, CustomStringConvertible {
    case f64 = "F64"
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"
    case f8E4M3 = "F8_E4M3"
    case f8E5M2 = "F8_E5M2"
    case i64 = "I64"
    case i32 = "I32"
    case i16 = "I16"
    case i8 = "I8"
    case u64 = "U64"
    case u32 = "U32"
    case u16 = "U16"
    case u8 = "U8"
    case bool = "BOOL"

    /// Bytes per element.
    public var byteSize: Int {
        switch self {
        case .f64, .i64, .u64: 8
        case .f32, .i32, .u32: 4
        case .f16, .bf16, .i16, .u16: 2
        case .f8E4M3, .f8E5M2, .i8, .u8, .bool: 1
        }
    }

    /// Whether `SafeTensorsFile` can convert this dtype to `Float` exactly
    /// (F32, BF16, F16) or with round-to-nearest-even (F64).
    public var isReadableAsFloat: Bool {
        switch self {
        case .f64, .f32, .f16, .bf16: true
        default: false
        }
    }

    /// Whether `SafeTensorsWriter` can produce this dtype from `Float` data.
    public var isWritableFromFloat: Bool {
        switch self {
        case .f32, .f16, .bf16: true
        default: false
        }
    }

    public var description: String { rawValue }
}
