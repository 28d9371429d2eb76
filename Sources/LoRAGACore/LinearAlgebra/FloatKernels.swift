/// One-pass vector loops over float data for the per-byte hot paths (a dense layer's sum takes
/// every byte every worker sends). They read raw memory at any alignment: wire payloads sit
/// at whatever offset their frame put them.
///
/// The NaN/Inf test: a float is NaN or ±Inf exactly when its exponent bits are all ones.
/// Comparing the masked exponent for equality and OR-ing the lane masks needs only SSE2
/// (the baseline these files are compiled for); a running max of the exponent would need
/// SSE4.1 and runs at half the speed without it.
public enum FloatKernels {
    @usableFromInline static let lanes = 16
    @usableFromInline static let exponentBits: UInt32 = 0x7F80_0000

    /// Whether any of the `count` floats at `source` is NaN or ±Inf.
    public static func containsNonFinite(_ source: UnsafeRawPointer, count: Int) -> Bool {
        let exponent = SIMD16<UInt32>(repeating: exponentBits)
        var found = SIMDMask<SIMD16<Int32>>(repeating: false)
        var index = 0
        while index + lanes <= count {
            Prefetch.read(source + 4 * index + Prefetch.distance)   // a whole sum is scanned from memory
            let bits = source.loadUnaligned(fromByteOffset: 4 * index, as: SIMD16<UInt32>.self)
            found .|= (bits & exponent) .== exponent
            index += lanes
        }
        var tail = false
        while index < count {
            tail = tail || source.loadUnaligned(fromByteOffset: 4 * index, as: UInt32.self) & exponentBits == exponentBits
            index += 1
        }
        return any(found) || tail
    }

    /// `target[i] = source[i]` (`store`) or `target[i] += source[i]` for the `count` native-endian
    /// floats at `source`, checking them for NaN/Inf in the same pass. Returns true when one
    /// was: every value is written all the same, so the caller must discard the target.
    public static func accumulate(_ source: UnsafeRawPointer, count: Int, into target: UnsafeMutablePointer<Float>, store: Bool) -> Bool {
        let exponent = SIMD16<UInt32>(repeating: exponentBits)
        var found = SIMDMask<SIMD16<Int32>>(repeating: false)
        let output = UnsafeMutableRawPointer(target)
        var index = 0
        // Two loops rather than a branch per vector: the add loop also reads the target.
        if store {
            while index + lanes <= count {
                Prefetch.write(output + 4 * index + Prefetch.distance)   // a large sum comes from memory
                let values = source.loadUnaligned(fromByteOffset: 4 * index, as: SIMD16<Float>.self)
                found .|= (unsafeBitCast(values, to: SIMD16<UInt32>.self) & exponent) .== exponent
                output.storeBytes(of: values, toByteOffset: 4 * index, as: SIMD16<Float>.self)
                index += lanes
            }
        } else {
            while index + lanes <= count {
                Prefetch.write(output + 4 * index + Prefetch.distance)
                let values = source.loadUnaligned(fromByteOffset: 4 * index, as: SIMD16<Float>.self)
                found .|= (unsafeBitCast(values, to: SIMD16<UInt32>.self) & exponent) .== exponent
                let sum = output.loadUnaligned(fromByteOffset: 4 * index, as: SIMD16<Float>.self) + values
                output.storeBytes(of: sum, toByteOffset: 4 * index, as: SIMD16<Float>.self)
                index += lanes
            }
        }
        var tail = false
        while index < count {
            let value = source.loadUnaligned(fromByteOffset: 4 * index, as: Float.self)
            tail = tail || !value.isFinite
            target[index] = store ? value : target[index] + value
            index += 1
        }
        return any(found) || tail
    }
}
