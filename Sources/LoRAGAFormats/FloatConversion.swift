import LoRAGACore

/// Element conversions between the stored dtypes and `Float`, as tight loops
/// over raw buffers (no per-element calls, no bounds checks) that -O vectorizes.
///
/// Stored data is little-endian (the safetensors specification); the
/// `littleEndian:` initializers are no-ops on every host we build for.
enum FloatConversion {
    /// Converts `count` stored elements at `source` to `Float`, storing them into
    /// `destination` or, with `accumulate`, adding them to what is there.
    ///
    /// F32, BF16 and F16 widen exactly; F64 rounds to nearest even.
    static func decode(
        _ source: UnsafeRawPointer, as dtype: TensorDType, count: Int,
        into destination: UnsafeMutablePointer<Float>, accumulate: Bool
    ) {
        switch dtype {
        case .f32:
            apply(source, UInt32.self, count, destination, accumulate) { Float(bitPattern: UInt32(littleEndian: $0)) }
        case .bf16:
            // BF16 is the upper half of an IEEE float32.
            apply(source, UInt16.self, count, destination, accumulate) { Float(bitPattern: UInt32(UInt16(littleEndian: $0)) &<< 16) }
        case .f16:
            apply(source, UInt16.self, count, destination, accumulate) { widenHalf(UInt16(littleEndian: $0)) }
        case .f64:
            apply(source, UInt64.self, count, destination, accumulate) { Float(Double(bitPattern: UInt64(littleEndian: $0))) }
        }
    }

    /// Converts `count` floats to `dtype` little-endian bytes at `destination`:
    /// F32 verbatim, BF16 and F16 rounded to nearest even (NaN stays NaN).
    /// - Precondition: `dtype.isWritableFromFloat`.
    static func encode(
        _ source: UnsafePointer<Float>, count: Int, as dtype: TensorDType, into destination: UnsafeMutableRawPointer
    ) {
        switch dtype {
        case .f32:
            let out = destination.bindMemory(to: UInt32.self, capacity: count)
            for i in 0..<count { out[i] = source[i].bitPattern.littleEndian }
        case .bf16:
            let out = destination.bindMemory(to: UInt16.self, capacity: count)
            for i in 0..<count { out[i] = roundToBFloat16(source[i]).littleEndian }
        case .f16:
            // Float16(_:) rounds to nearest even and keeps NaN; writing is not a hot path.
            let out = destination.bindMemory(to: UInt16.self, capacity: count)
            for i in 0..<count { out[i] = Float16(source[i]).bitPattern.littleEndian }
        case .f64:
            preconditionFailure("dtype \(dtype) is not writable from Float")
        }
    }

    /// IEEE binary16 → binary32, bit-identical to `Float(Float16(bitPattern:))`
    /// (checked for all 65 536 patterns in the tests) but branch-free, so it
    /// vectorizes where the library conversion is a per-element call on x86-64.
    @inline(__always)
    static func widenHalf(_ half: UInt16) -> Float {
        let bits = UInt32(half)
        let magnitude = bits & 0x7fff
        // Placing exponent and mantissa 13 bits up and scaling by 2^(127-15)
        // rebiases normals and normalizes subnormals exactly.
        let finite = (Float(bitPattern: magnitude &<< 13) * 0x1p112).bitPattern
        // Inf/NaN keep their payload under an all-ones exponent; NaN is quieted as Float16 does.
        let special = (magnitude &<< 13) | 0x7f80_0000 | (magnitude > 0x7c00 ? 0x0040_0000 : 0)
        let widened = magnitude >= 0x7c00 ? special : finite
        return Float(bitPattern: widened | ((bits & 0x8000) &<< 16))
    }

    /// binary32 → bfloat16 bits, rounding to nearest even; a NaN keeps its sign
    /// and gets the quiet bit so truncating its payload cannot turn it into Inf.
    @inline(__always)
    static func roundToBFloat16(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        let rounded = UInt16(truncatingIfNeeded: (bits &+ 0x7fff &+ ((bits &>> 16) & 1)) &>> 16)
        let quietNaN = UInt16(truncatingIfNeeded: bits &>> 16) | 0x0040
        return value.isNaN ? quietNaN : rounded
    }

    /// One loop per direction so each compiles to a straight vectorizable body.
    @inline(__always)
    private static func apply<Stored>(
        _ source: UnsafeRawPointer, _ type: Stored.Type, _ count: Int,
        _ destination: UnsafeMutablePointer<Float>, _ accumulate: Bool, _ widen: (Stored) -> Float
    ) {
        let stored = source.bindMemory(to: Stored.self, capacity: count)
        if accumulate {
            for i in 0..<count { destination[i] += widen(stored[i]) }
        } else {
            for i in 0..<count { destination[i] = widen(stored[i]) }
        }
    }
}
