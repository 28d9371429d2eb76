/// Counter-based random test matrices: entry (i, j) of a named matrix is a pure function
/// of (seed, layer, matrix kind, i, j). Nobody stores or sends test matrices — any process
/// regenerates exactly the rows it needs — and a sketch does not depend on how the rows
/// of a gradient were cut into blocks or spread over workers.
///
/// Entries are sums of four independent uniforms, centred and scaled to variance 1: an
/// isotropic, sub-Gaussian, nearly normal distribution (excess kurtosis −0.3). Randomized
/// range finders and single-pass sketches need nothing more (Halko et al. 2011 §10;
/// Tropp et al. 2017 §3.9 allow any such test matrix), and one 64-bit hash per entry in
/// integer arithmetic is far cheaper than Box–Muller's log, sin and cos, which would make
/// drawing test matrices a large share of a sketch. Integer arithmetic also gives the same
/// bits on every machine, which libm does not promise.
public struct TestMatrixGenerator: Sendable {
    /// Which test matrix of a layer's sketch.
    public enum Kind: UInt64, Sendable {
        case range = 1          // Ω, cols(G) × k: Y = G Ω
        case coRange = 2        // Ψᵀ, rows(G) × l: W = Ψ G
        case coreLeft = 3       // Φᵀ, rows(G) × s: Z = Φ G Ξᵀ
        case coreRight = 4      // Ξᵀ, cols(G) × s
    }

    public let seed: UInt64
    public let layerKey: UInt64

    public init(seed: UInt64, layerName: String) {
        self.seed = seed
        self.layerKey = TestMatrixGenerator.fnv1a(layerName)
    }

    /// Rows `rows` of the `kind` matrix with `width` columns; entries have mean 0, variance 1.
    public func rows(_ rows: Range<Int>, width: Int, kind: Kind) -> Matrix {
        var result = Matrix(rows: rows.count, cols: width)
        let stream = mix(seed ^ mix(layerKey &+ kind.rawValue &* 0x9E37_79B9_7F4A_7C15))
        // Four 16-bit uniforms u_i ∈ {0…65535}: Σ u_i has mean 131070 and variance 4·(65536² − 1)/12.
        let scale = Float((3.0 / (65536.0 * 65536.0 - 1)).squareRoot())
        result.storage.withUnsafeMutableBufferPointer { values in
            for (localRow, row) in rows.enumerated() {
                let rowBase = UInt64(row) &* UInt64(width)
                let out = localRow * width
                for j in 0..<width {
                    let bits = mix(stream &+ (rowBase &+ UInt64(j)) &* 0xD1B5_4A32_D192_ED03)
                    let sum = Int64(bits & 0xFFFF) + Int64((bits >> 16) & 0xFFFF)
                        + Int64((bits >> 32) & 0xFFFF) + Int64(bits >> 48)
                    values[out + j] = Float(sum - 131_070) * scale
                }
            }
        }
        return result
    }

    /// The whole `kind` matrix with `count` rows.
    public func matrix(rowCount: Int, width: Int, kind: Kind) -> Matrix {
        rows(0..<rowCount, width: width, kind: kind)
    }

    /// SplitMix64's finalizer: a bijective avalanche mix of 64 bits.
    @inline(__always)
    func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    static func fnv1a(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01B3
        }
        return hash
    }
}
