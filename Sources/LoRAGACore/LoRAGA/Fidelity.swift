/// LoRA-GA's objective as a number (LoRAGACore.docc, "Fidelity: the ratio"):
///
///     ratio = ‖P_B G + G P_A − G‖_F / ‖G − G_2r‖_F        (optimum 1.0)
///
/// P_B projects onto span(lora_B), P_A onto the row span of lora_A. Expanding the square,
///
///     ‖G − P_B G − G P_A‖² = ‖G‖² − ‖Ubᵀ G‖² − ‖G Va‖² + 2 ‖Ubᵀ G Va‖²
///
/// with orthonormal bases Ub, Va; every term is linear in G or a norm of such, so the
/// numerator streams over row blocks of G and never needs G whole.
public struct FidelityAccumulator {
    /// Orthonormal basis of span(lora_B): rows(G) × r.
    let ub: Matrix
    /// Orthonormal basis of the row span of lora_A, as columns: cols(G) × r.
    let va: Matrix
    var frobeniusSquared: Double = 0
    var gVaSquared: Double = 0
    var ubTG: Matrix          // r × cols
    var ubTGVa: Matrix        // r × r
    var directResidualSquared: Double?

    public init(factors: LoRAFactors) throws {
        // Factors may be scaled or rounded to bf16: re-orthonormalize rather than trust them.
        self.ub = try factors.b.orthonormalizedColumns()
        self.va = try factors.a.transposed().orthonormalizedColumns()
        self.ubTG = Matrix(rows: ub.cols, cols: va.rows)
        self.ubTGVa = Matrix(rows: ub.cols, cols: va.cols)
    }

    /// Folds the row block of the *summed* gradient (norms are not linear, so blocks must not repeat rows).
    public mutating func add(_ block: RowBlock) {
        frobeniusSquared += block.frobeniusNormSquared
        let gVa = Matrix.product(block, va)                                   // G_b Va: b × r
        gVaSquared += gVa.frobeniusNormSquared
        Matrix.accumulateTransposedProduct(ub, block, into: &ubTG)            // Ubᵀ G += Ub[i:j]ᵀ G_b
        let ubBlock = ub.rows(block.rowRange)
        ubTGVa.add(Matrix.product(ubBlock, gVa, transposeA: true))           // Ubᵀ G Va += Ub[i:j]ᵀ G_b Va
    }

    /// Optional second pass: the residual R_b = G_b − Ub_b (UbᵀG) − G_b Va Vaᵀ of each block,
    /// summed directly. Exact even when the residual is tiny next to ‖G‖ (the one-pass
    /// expansion above cancels catastrophically there). Needs the first pass complete.
    public mutating func addResidual(_ block: RowBlock) {
        var residual = Matrix(rows: block.rowCount, cols: block.cols, storage: Array(block.values))
        let gVa = Matrix.product(block, va)                                   // b × r
        let ubBlock = ub.rows(block.rowRange)                                  // b × r
        residual.storage.withUnsafeMutableBufferPointer { r in
            ubBlock.storage.withUnsafeBufferPointer { ubValues in
                ubTG.storage.withUnsafeBufferPointer { ubTGValues in
                    BLAS.gemm(transposeA: false, transposeB: false, m: block.rowCount, n: block.cols, k: ub.cols, alpha: -1,
                              a: ubValues.baseAddress!, lda: ub.cols, b: ubTGValues.baseAddress!, ldb: ubTG.cols,
                              beta: 1, c: r.baseAddress!, ldc: block.cols)
                }
            }
            gVa.storage.withUnsafeBufferPointer { gVaValues in
                va.storage.withUnsafeBufferPointer { vaValues in
                    BLAS.gemm(transposeA: false, transposeB: true, m: block.rowCount, n: block.cols, k: va.cols, alpha: -1,
                              a: gVaValues.baseAddress!, lda: va.cols, b: vaValues.baseAddress!, ldb: va.cols,
                              beta: 1, c: r.baseAddress!, ldc: block.cols)
                }
            }
        }
        directResidualSquared = (directResidualSquared ?? 0) + residual.frobeniusNormSquared
    }

    /// ‖G‖_F², accumulated so far.
    public var gradientNormSquared: Double { frobeniusSquared }

    /// ‖P_B G + G P_A − G‖_F.
    public var residualNorm: Double {
        if let direct = directResidualSquared { return direct.squareRoot() }
        return Swift.max(expandedResidualSquared, 0).squareRoot()
    }

    var expandedResidualSquared: Double {
        frobeniusSquared - ubTG.frobeniusNormSquared - gVaSquared + 2 * ubTGVa.frobeniusNormSquared
    }

    /// Whether the expanded residual needs the direct pass (`addResidual`). Its terms carry
    /// Float rounding of about 1e-6·‖G‖², so below 1 % of ‖G‖² the residual's relative error
    /// would pass 1e-4 (the ratio's fourth digit); above, the expansion is as good as direct.
    public var expansionIsInaccurate: Bool {
        directResidualSquared == nil && expandedResidualSquared < 0.01 * frobeniusSquared
    }
}

public enum Fidelity {
    /// ‖G − G_t‖_F from ‖G‖_F² and the top t singular values (exact when they are exact).
    public static func tailNorm(gradientNormSquared: Double, topSingularValues: [Double]) -> Double {
        let captured = topSingularValues.reduce(0) { $0 + $1 * $1 }
        return Swift.max(gradientNormSquared - captured, 0).squareRoot()
    }

    /// The ratio, with the degenerate case made explicit: when G has rank ≤ 2r the optimum
    /// residual is 0 and the ratio is reported as 1 if the residual is also ~0 (relative to ‖G‖).
    public static func ratio(residualNorm: Double, tailNorm: Double, gradientNorm: Double) -> Double {
        let negligible = 1e-5 * gradientNorm
        if tailNorm <= negligible {
            return residualNorm <= 10 * negligible ? 1 : .infinity
        }
        return residualNorm / tailNorm
    }

    /// Ratio for a gradient held in memory, against its exact (double precision) spectrum.
    public static func exactRatio(gradient: Matrix, factors: LoRAFactors) throws -> Double {
        var accumulator = try FidelityAccumulator(factors: factors)
        let blocks = InMemoryRowBlocks(gradient)
        try blocks.forEachRowBlock { accumulator.add($0) }
        try blocks.forEachRowBlock { accumulator.addResidual($0) }
        let spectrum = try gradient.exactSingularValues()
        // Sum the tail directly: ‖G‖² − Σ top s² would cancel when the tail is small.
        let tail = spectrum.dropFirst(2 * factors.a.rows).reduce(0) { $0 + $1 * $1 }.squareRoot()
        return ratio(residualNorm: accumulator.residualNorm, tailNorm: tail, gradientNorm: accumulator.gradientNormSquared.squareRoot())
    }
}
