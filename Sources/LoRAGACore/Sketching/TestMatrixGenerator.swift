import Foundation

/// Counter-based Gaussian test matrices: entry (i, j) of a named matrix is a pure function
/// of (seed, layer, matrix kind, i, j). Nobody stores or sends test matrices — any process
/// regenerates exactly the rows it needs — and a sketch does not depend on how the rows
/// of a gradient were cut into blocks or spread over workers (DESIGN.md §2).
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

    /// Rows `rows` of the `kind` matrix with `width` columns, standard normal entries.
    public func rows(_ rows: Range<Int>, width: Int, kind: Kind) -> Matrix {
        var result = Matrix(rows: rows.count, cols: width)
        let stream = mix(seed ^ mix(layerKey &+ kind.rawValue &* 0x9E37_79B9_7F4A_7C15))
        result.storage.withUnsafeMutableBufferPointer { values in
            for (localRow, row) in rows.enumerated() {
                // One counter per pair of entries: Box–Muller turns two uniforms into two normals.
                let rowBase = UInt64(row) &* UInt64((width + 1) / 2)
                var j = 0
                while j < width {
                    let bits = mix(stream &+ (rowBase &+ UInt64(j / 2)) &* 0xD1B5_4A32_D192_ED03)
                    let u1 = (Double(bits >> 32) + 0.5) * 0x1p-32
                    let u2 = (Double(bits & 0xFFFF_FFFF) + 0.5) * 0x1p-32
                    let radius = (-2 * Foundation.log(u1)).squareRoot()
                    let angle = 2 * Double.pi * u2
                    values[localRow * width + j] = Float(radius * Foundation.cos(angle))
                    if j + 1 < width {
                        values[localRow * width + j + 1] = Float(radius * Foundation.sin(angle))
                    }
                    j += 2
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
