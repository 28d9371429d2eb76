/// Element type of a gradient, shard or adapter tensor: lora-ga's one dtype vocabulary.
///
/// Each case carries every spelling it has: the safetensors header name (the raw value,
/// `BF16`), the byte that names it on the wire (`wireCode`), and the name users type in flags
/// and settings files (`init?(_:)`, either case). Only these four are read: a tensor of another
/// safetensors dtype (an `I64` step counter) is skipped, and an unknown dtype is refused.
public enum TensorDType: String, Sendable, CaseIterable, Codable {
    case f32 = "F32"
    case bf16 = "BF16"
    case f16 = "F16"
    /// Read from files only (rounded to nearest even): never written, never a shard payload.
    case f64 = "F64"

    /// The safetensors header name.
    public var safetensorsName: String { rawValue }

    /// The u8 code of `JobSpec.payloadDType`, `LayerInfo.sourceDType` and `Shard.dtype`.
    public var wireCode: UInt8 {
        switch self {
        case .f32: 0
        case .bf16: 1
        case .f16: 2
        case .f64: 3
        }
    }

    /// The dtype a wire code names, or `nil` for a code no dtype has.
    public init?(wireCode: UInt8) {
        switch wireCode {
        case 0: self = .f32
        case 1: self = .bf16
        case 2: self = .f16
        case 3: self = .f64
        default: return nil
        }
    }

    /// Bytes per element.
    public var byteSize: Int {
        switch self {
        case .f64: 8
        case .f32: 4
        case .f16, .bf16: 2
        }
    }

    /// Whether `Float` data can be stored in this dtype (adapters, synthetic files, shard payloads).
    public var isWritableFromFloat: Bool { self != .f64 }

    /// The dtypes `Float` data can be written as: F32, BF16, F16.
    public static var writableCases: [TensorDType] { allCases.filter(\.isWritableFromFloat) }

    /// The lower-case name users type: `f32`, `bf16`, `f16`, `f64`.
    public var argumentName: String { rawValue.lowercased() }
}

extension TensorDType: LosslessStringConvertible {
    /// A name as typed in flags and settings files, in either case: `bf16`, `BF16`.
    public init?(_ text: String) { self.init(rawValue: text.uppercased()) }

    /// The safetensors name, as messages show it: `BF16`.
    public var description: String { rawValue }
}
