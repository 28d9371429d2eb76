/// One-pass sketch of a streamed matrix (Tropp, Yurtsever, Udell & Cevher 2019,
/// "Streaming low-rank matrix approximation…", §3–4):
///
///     range     Y = G Ω      (rows × k)
///     co-range  X = Υ G      (k × cols)
///     core      Z = Φ G Ξᵀ   (s × s),  s = 2k + 1
///
/// All three are linear in G, so row blocks from any worker fold in any order and two
/// sketches of the same layer add up (`merge`). Test matrices are regenerated per row
/// from (seed, layer); memory is O((rows + cols) · s), never rows · cols.
public struct SingleViewSketch: Sendable {
    public let rows: Int
    public let cols: Int
    public let targetRank: Int
    /// Range / co-range width k.
    public let width: Int
    /// Core width s.
    public let coreWidth: Int
    let generator: TestMatrixGenerator
    let layerName: String

    // Test matrices (regenerable, kept for speed): Ω [cols × k], Ξᵀ [cols × s].
    let omega: Matrix
    let xiT: Matrix
    // The row-indexed test matrices Υᵀ [rows × k] and Φᵀ [rows × s] are regenerated for the
    // rows of each block: b·(k+s) normals against a b·cols·(k+s) GEMM costs nothing.

    public private(set) var y: Matrix
    public private(set) var x: Matrix
    public private(set) var z: Matrix

    /// - Parameters:
    ///   - width: k; Tropp et al. recommend k ≈ 2·targetRank or more for slowly decaying spectra.
    public init(rows: Int, cols: Int, targetRank: Int, width: Int, seed: UInt64, layerName: String) throws {
        guard targetRank <= Swift.min(rows, cols) else {
            throw RandomizedSVDError.rankTooLarge(layer: layerName, rows: rows, cols: cols, targetRank: targetRank)
        }
        let k = Swift.min(Swift.max(width, targetRank), rows, cols)
        let s = Swift.min(2 * k + 1, Swift.max(rows, cols))
        self.rows = rows
        self.cols = cols
        self.targetRank = targetRank
        self.width = k
        self.coreWidth = s
        self.layerName = layerName
        let generator = TestMatrixGenerator(seed: seed, layerName: layerName)
        self.generator = generator
        self.omega = generator.matrix(rowCount: cols, width: k, kind: .range)
        self.xiT = generator.matrix(rowCount: cols, width: s, kind: .coreRight)
        self.y = Matrix(rows: rows, cols: k)
        self.x = Matrix(rows: k, cols: cols)
        self.z = Matrix(rows: s, cols: s)
    }

    /// Columns of the test matrices every row block is multiplied by (Ω and Ξᵀ, k + s with
    /// s = 2k + 1): BLAS packs them anew for each block, so they size the blocks
    /// (`RowBlock.rowsPerProductBlock`).
    public static func blockProductWidth(width k: Int) -> Int { k + 2 * k + 1 }

    /// Fewest rows of G per folded block (`RowBlock.rowsPerProductBlock`'s `minimumRows`):
    /// the co-range product Υ_b G_b has the block's rows as its inner dimension, so short
    /// blocks starve it.
    public static let minimumBlockRows = 256

    /// Floats held by this sketch (state plus test matrices), for memory accounting.
    public var floatCount: Int {
        omega.storage.count + xiT.storage.count + y.storage.count + x.storage.count + z.storage.count
    }

    /// Adds a row block's contribution. Blocks may repeat rows (several workers): sums are linear.
    public mutating func fold(_ block: RowBlock) {
        precondition(block.cols == cols && block.rowStart + block.rowCount <= rows, "row block \(block.rowRange)×\(block.cols) does not fit sketch \(rows)×\(cols)")
        guard block.rowCount > 0 else { return }
        Matrix.accumulateProduct(block, omega, into: &y, rowOffset: block.rowStart, beta: 1)   // Y[i:j] += G_b Ω
        let upsilonBlock = generator.rows(block.rowRange, width: width, kind: .coRange)
        Matrix.accumulateTransposedProduct(upsilonBlock, block, into: &x, leftRowOffset: 0)     // X += Υ[:, i:j] G_b
        let right = Matrix.product(block, xiT)                                                 // G_b Ξᵀ
        let phiBlock = generator.rows(block.rowRange, width: coreWidth, kind: .coreLeft)
        z.add(Matrix.product(phiBlock, right, transposeA: true))                              // Z += Φ[:, i:j] G_b Ξᵀ
    }

    /// Adds a block's contribution at its offset (Tropp et al.'s sketches are linear in G, and
    /// G_b's embedding is zero outside its rectangle): with rows i:j and columns c0:c1,
    ///
    ///     Y[i:j, :]  += G_b Ω[c0:c1, :]
    ///     X[:, c0:c1] += Υ[:, i:j] G_b
    ///     Z          += Φ[:, i:j] G_b Ξᵀ[c0:c1, :]
    ///
    /// A full-width block takes the row-block fold unchanged.
    public mutating func fold(_ block: LayerBlock) {
        let region = block.region
        precondition(region.rows.upperBound <= rows && region.cols.upperBound <= cols, "block \(region) does not fit sketch \(rows)×\(cols)")
        guard !region.isEmpty else { return }
        if region.cols == 0..<cols {
            return fold(RowBlock(rowStart: region.rows.lowerBound, rowCount: region.rows.count, cols: cols, values: block.values))
        }
        let (m, w, k, s) = (region.rows.count, region.cols.count, width, coreWidth)
        let (c0, cols) = (region.cols.lowerBound, self.cols)
        let g = block.values.baseAddress!
        omega.storage.withUnsafeBufferPointer { omegaValues in
            y.storage.withUnsafeMutableBufferPointer { yValues in
                BLAS.gemm(transposeA: false, transposeB: false, m: m, n: k, k: w, a: g, lda: w,
                          b: omegaValues.baseAddress! + c0 * k, ldb: k, beta: 1,
                          c: yValues.baseAddress! + region.rows.lowerBound * k, ldc: k)              // Y[i:j] += G_b Ω[c0:c1]
            }
        }
        let upsilonBlock = generator.rows(region.rows, width: k, kind: .coRange)                     // Υᵀ[i:j, :]
        upsilonBlock.storage.withUnsafeBufferPointer { upsilon in
            x.storage.withUnsafeMutableBufferPointer { xValues in
                BLAS.gemm(transposeA: true, transposeB: false, m: k, n: w, k: m, a: upsilon.baseAddress!, lda: k,
                          b: g, ldb: w, beta: 1, c: xValues.baseAddress! + c0, ldc: cols)          // X[:, c0:c1] += Υ[:, i:j] G_b
            }
        }
        var right = Matrix(rows: m, cols: s)
        xiT.storage.withUnsafeBufferPointer { xi in
            right.storage.withUnsafeMutableBufferPointer { r in
                BLAS.gemm(transposeA: false, transposeB: false, m: m, n: s, k: w, a: g, lda: w,
                          b: xi.baseAddress! + c0 * s, ldb: s, beta: 0, c: r.baseAddress!, ldc: s)    // G_b Ξᵀ[c0:c1]
            }
        }
        let phiBlock = generator.rows(region.rows, width: s, kind: .coreLeft)
        z.add(Matrix.product(phiBlock, right, transposeA: true))                                   // Z += Φ[:, i:j] G_b Ξᵀ[c0:c1]
    }

    /// Adds another sketch of the same layer (same seed, sizes): the sketch of the sum.
    public mutating func merge(_ other: SingleViewSketch) {
        precondition(other.rows == rows && other.cols == cols && other.width == width && other.coreWidth == coreWidth && other.generator.seed == generator.seed && other.layerName == layerName,
                     "merging sketches of different layers or sizes")
        y.add(other.y)
        x.add(other.x)
        z.add(other.z)
    }

    /// Φ · Q, regenerating Φᵀ in row chunks rather than holding rows × s of it.
    func phiTimes(_ q: Matrix) -> Matrix {
        var result = Matrix(rows: coreWidth, cols: q.cols)
        let chunk = 1024
        for start in stride(from: 0, to: rows, by: chunk) {
            let range = start..<Swift.min(start + chunk, rows)
            let phiRows = generator.rows(range, width: coreWidth, kind: .coreLeft)
            result.add(Matrix.product(phiRows, q.rows(range), transposeA: true))
        }
        return result
    }

    /// Fixed-rank approximation [[Ĝ]]_t with Ĝ = Q C Pᵀ (Tropp et al. 2019, eq. 4.3 and §5):
    /// Q = orth(Y), P = orth(Xᵀ), C = (ΦQ)† Z ((ΞP)†)ᵀ.
    public func truncatedSVD() throws -> TruncatedSVD {
        guard y.storage.allSatisfy(\.isFinite), x.storage.allSatisfy(\.isFinite), z.storage.allSatisfy(\.isFinite) else {
            throw RandomizedSVDError.nonFinite(layer: layerName)
        }
        guard y.frobeniusNormSquared > 0 else { throw RandomizedSVDError.zeroMatrix(layer: layerName) }
        let q = try y.orthonormalizedColumns()                                     // rows × k
        let pT = try x.orthonormalizedRows()                                       // Pᵀ: k × cols
        let phiQ = phiTimes(q)                                                     // s × k
        let xiP = Matrix.product(xiT, pT, transposeA: true, transposeB: true)      // s × k
        let left = try phiQ.leastSquaresSolution(z)                                // k × s = (ΦQ)† Z
        let core = try xiP.leastSquaresSolution(left.transposed()).transposed()    // k × k = left ((ΞP)†)ᵀ
        let small = try core.singularValueDecomposition()
        let t = targetRank
        let u = Matrix.product(q, small.u.columns(0..<t))                          // Q U_c
        let vt = Matrix.product(small.vt.rows(0..<t), pT)                          // V_cᵀ Pᵀ
        var result = TruncatedSVD(u: u, s: Array(small.s.prefix(t)), vt: vt)
        result.applySignConvention()
        return result
    }
}
