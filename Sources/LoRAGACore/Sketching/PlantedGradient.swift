import Foundation

/// A synthetic gradient with a known spectrum: G = U · diag(s) · Vᵀ with U [rows × ρ] and
/// V [cols × ρ] orthonormal (QR of random test matrices) and s_i = s₁ · i^(−decay). The exact top-2r
/// answer is known without an SVD, so huge layers can be checked. Split across workers as
/// G_w = G / W + E_w with Σ_w E_w = 0: no single worker's file is the answer, only the sum.
public struct PlantedGradient: Sendable {
    public let rows: Int
    public let cols: Int
    public let singularValues: [Double]
    public let workers: Int
    /// Relative size of each worker's cancelling noise E_w, as a fraction of G's RMS entry.
    public let workerNoise: Double
    let seed: UInt64
    let scaledU: Matrix     // U · diag(s): rows × ρ
    let v: Matrix           // cols × ρ
    let noiseScale: Float

    public init(rows: Int, cols: Int, plantedRank: Int, decay: Double, topSingularValue: Double = 1,
                workers: Int = 1, workerNoise: Double = 1, seed: UInt64 = 0) throws {
        let rank = Swift.min(plantedRank, rows, cols)
        precondition(rank >= 1 && workers >= 1, "planted rank and workers must be positive")
        self.rows = rows
        self.cols = cols
        self.workers = workers
        self.workerNoise = workerNoise
        self.seed = seed
        let values = (1...rank).map { topSingularValue * pow(Double($0), -decay) }
        self.singularValues = values
        let generator = TestMatrixGenerator(seed: seed, layerName: "planted-gradient")
        var u = try generator.matrix(rowCount: rows, width: rank, kind: .coRange).orthonormalizedColumns()
        for i in 0..<rows {
            for j in 0..<rank { u[i, j] *= Float(values[j]) }
        }
        self.scaledU = u
        self.v = try generator.matrix(rowCount: cols, width: rank, kind: .range).orthonormalizedColumns()
        let rms = (values.reduce(0) { $0 + $1 * $1 } / Double(rows * cols)).squareRoot()
        self.noiseScale = Float(workerNoise * rms)
    }

    /// ‖G − G_t‖_F, exactly.
    public func tailNorm(after t: Int) -> Double {
        singularValues.dropFirst(t).reduce(0) { $0 + $1 * $1 }.squareRoot()
    }

    public var frobeniusNorm: Double { tailNorm(after: 0) }

    /// Rows `range` of the full gradient G.
    public func rows(_ range: Range<Int>) -> Matrix {
        Matrix.product(scaledU.rows(range), v, transposeB: true)
    }

    /// Rows `range` of worker `worker`'s share G / W + E_w.
    public func rows(_ range: Range<Int>, worker: Int) -> Matrix {
        precondition(worker >= 0 && worker < workers, "worker \(worker) outside 0..<\(workers)")
        var block = rows(range)
        guard workers > 1 else { return block }
        block.scale(by: 1 / Float(workers))
        if worker < workers - 1 {
            block.add(noise(range, worker: worker))
        } else {
            // The last worker cancels everyone else's noise so the shares sum to G.
            for other in 0..<(workers - 1) {
                var cancel = noise(range, worker: other)
                cancel.scale(by: -1)
                block.add(cancel)
            }
        }
        return block
    }

    private func noise(_ range: Range<Int>, worker: Int) -> Matrix {
        var e = TestMatrixGenerator(seed: seed &+ UInt64(worker + 1), layerName: "planted-noise")
            .rows(range, width: cols, kind: .coreLeft)
        e.scale(by: noiseScale)
        return e
    }
}
