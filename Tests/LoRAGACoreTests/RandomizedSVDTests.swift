import Foundation
import Testing
@testable import LoRAGACore

/// Randomized SVD and LoRA-GA factors against exact answers on planted spectra.
@Suite struct RandomizedSVDTests {
    struct Case: CustomStringConvertible, Sendable {
        var name: String
        var rows: Int
        var cols: Int
        var plantedRank: Int
        var decay: Double
        var rank: Int
        /// Single-pass sketches are weaker on flat planted spectra (see SVDDefaults).
        var sketchBound: Double = 1.05
        var description: String { "\(name) \(rows)×\(cols) ρ=\(plantedRank) decay=\(decay) r=\(rank)" }
    }

    static let cases: [Case] = [
        Case(name: "fast decay", rows: 300, cols: 200, plantedRank: 200, decay: 2.0, rank: 8),
        Case(name: "real-gradient decay", rows: 256, cols: 384, plantedRank: 256, decay: 0.8, rank: 8, sketchBound: 1.06),
        Case(name: "slow decay", rows: 256, cols: 256, plantedRank: 256, decay: 0.5, rank: 8, sketchBound: 1.15),
        Case(name: "exact low rank", rows: 200, cols: 150, plantedRank: 20, decay: 0.8, rank: 8),
        Case(name: "rank below 2r", rows: 200, cols: 150, plantedRank: 10, decay: 0.8, rank: 8),
        Case(name: "tall", rows: 1000, cols: 64, plantedRank: 64, decay: 0.8, rank: 4),
        Case(name: "wide", rows: 64, cols: 1000, plantedRank: 64, decay: 0.8, rank: 4),
        Case(name: "min side below 2r + oversampling", rows: 40, cols: 300, plantedRank: 40, decay: 0.8, rank: 16),
    ]

    func planted(_ c: Case) throws -> (PlantedGradient, Matrix) {
        let g = try PlantedGradient(rows: c.rows, cols: c.cols, plantedRank: c.plantedRank, decay: c.decay, seed: 3)
        return (g, g.rows(0..<c.rows))
    }

    func ratio(_ svd: TruncatedSVD, _ gradient: Matrix, rank: Int) throws -> Double {
        let factors = LoRAFactors(svd: svd, configuration: LoRAConfiguration(rank: rank, alpha: 16))
        return try Fidelity.exactRatio(gradient: gradient, factors: factors)
    }

    @Test(arguments: cases)
    func powerIterationsReachTheOptimum(_ c: Case) throws {
        let (planted, g) = try planted(c)
        let parameters = RandomizedSVDParameters(targetRank: 2 * c.rank, oversampling: SVDDefaults.oversampling(rank: c.rank), passes: SVDDefaults.passes, seed: 1)
        var source = InMemoryRowBlocks(g, blockRows: 37)   // odd block size: block edges must not matter
        let svd = try randomizedSVD(of: &source, parameters: parameters, layerName: "l")
        #expect(svd.u.rows == c.rows && svd.u.cols == 2 * c.rank && svd.vt.rows == 2 * c.rank && svd.vt.cols == c.cols)
        // The leading singular values match the planted ones.
        for i in 0..<min(c.rank, c.plantedRank) {
            #expect(abs(Double(svd.s[i]) - planted.singularValues[i]) <= 2e-3 * planted.singularValues[0], "s[\(i)]")
        }
        let value = try ratio(svd, g, rank: c.rank)
        #expect(value <= 1.01, "ratio \(value)")
    }

    @Test(arguments: cases.filter { $0.plantedRank >= 2 * $0.rank })
    func singlePassSketchIsCloseToTheOptimum(_ c: Case) throws {
        let (_, g) = try planted(c)
        var sketch = try SingleViewSketch(rows: c.rows, cols: c.cols, targetRank: 2 * c.rank, width: SVDDefaults.sketchWidth(rank: c.rank), seed: 1, layerName: "l")
        try InMemoryRowBlocks(g, blockRows: 50).forEachRowBlock { sketch.fold($0) }
        let value = try ratio(try sketch.truncatedSVD(), g, rank: c.rank)
        #expect(value <= c.sketchBound, "ratio \(value)")
    }

    @Test func sketchesOfSharesMergeIntoTheSketchOfTheSum() throws {
        let planted = try PlantedGradient(rows: 120, cols: 90, plantedRank: 90, decay: 0.8, workers: 3, seed: 5)
        var whole = try SingleViewSketch(rows: 120, cols: 90, targetRank: 8, width: 30, seed: 2, layerName: "x")
        try InMemoryRowBlocks(planted.rows(0..<120), blockRows: 64).forEachRowBlock { whole.fold($0) }
        var merged = try SingleViewSketch(rows: 120, cols: 90, targetRank: 8, width: 30, seed: 2, layerName: "x")
        for worker in 0..<3 {
            var share = try SingleViewSketch(rows: 120, cols: 90, targetRank: 8, width: 30, seed: 2, layerName: "x")
            try InMemoryRowBlocks(planted.rows(0..<120, worker: worker), blockRows: 17).forEachRowBlock { share.fold($0) }
            merged.merge(share)
        }
        let a = try whole.truncatedSVD(), b = try merged.truncatedSVD()
        for i in 0..<8 { #expect(abs(a.s[i] - b.s[i]) <= 1e-3 * a.s[0]) }
    }

    @Test func sameInputsGiveIdenticalFactors() throws {
        let g = try PlantedGradient(rows: 150, cols: 100, plantedRank: 100, decay: 0.8, seed: 9).rows(0..<150)
        let parameters = RandomizedSVDParameters(targetRank: 8, oversampling: 8, passes: 5, seed: 11)
        var first = InMemoryRowBlocks(g)
        var second = InMemoryRowBlocks(g)
        let a = try randomizedSVD(of: &first, parameters: parameters, layerName: "l")
        let b = try randomizedSVD(of: &second, parameters: parameters, layerName: "l")
        #expect(a == b)
    }

    @Test func signConventionMakesTheLargestEntryOfEachLeftVectorPositive() throws {
        let g = try PlantedGradient(rows: 80, cols: 60, plantedRank: 60, decay: 0.8, seed: 2).rows(0..<80)
        var source = InMemoryRowBlocks(g)
        let svd = try randomizedSVD(of: &source, parameters: .init(targetRank: 6, oversampling: 6, passes: 4, seed: 1), layerName: "l")
        for i in 0..<6 {
            let column = (0..<80).map { svd.u[$0, i] }
            let largest = column.max { abs($0) < abs($1) }!
            #expect(largest > 0)
        }
    }

    @Test func allZeroGradientIsAClearError() throws {
        var source = InMemoryRowBlocks(Matrix(rows: 50, cols: 40))
        #expect(throws: RandomizedSVDError.zeroMatrix(layer: "frozen.weight")) {
            try randomizedSVD(of: &source, parameters: .init(targetRank: 8, oversampling: 8, passes: 5, seed: 1), layerName: "frozen.weight")
        }
        var sketch = try SingleViewSketch(rows: 50, cols: 40, targetRank: 8, width: 20, seed: 1, layerName: "frozen.weight")
        try source.forEachRowBlock { sketch.fold($0) }
        #expect(throws: RandomizedSVDError.zeroMatrix(layer: "frozen.weight")) { try sketch.truncatedSVD() }
    }

    @Test func rankLargerThanTheLayerIsAClearError() throws {
        let error = #expect(throws: RandomizedSVDError.self) {
            _ = try RangeFinder(rows: 10, cols: 300, parameters: .init(targetRank: 16, oversampling: 16, passes: 5, seed: 1), layerName: "tiny.weight")
        }
        #expect(error?.description.contains("tiny.weight") == true)
        #expect(error?.description.contains("10×300") == true)
    }

    @Test func fidelityOfExactFactorsIsOne() throws {
        let g = try PlantedGradient(rows: 90, cols: 70, plantedRank: 70, decay: 0.8, seed: 4).rows(0..<90)
        let full = try g.singularValueDecomposition()
        let svd = TruncatedSVD(u: full.u.columns(0..<8), s: Array(full.s.prefix(8)), vt: full.vt.rows(0..<8))
        #expect(abs(try ratio(svd, g, rank: 4) - 1) < 1e-3)
    }

    /// B must take the r-th..2r-th left directions when A takes the top r right ones: with B on
    /// the top r as well, P_B G P_A = G_r is counted twice and ‖G − G_r‖ is left, so the residual
    /// is √(‖G − G_r‖² + ‖G_r‖²) instead of ‖G − G_2r‖.
    @Test func fidelityOfSwappedDirectionsIsTheirResidualOverTheOptimum() throws {
        let g = try PlantedGradient(rows: 90, cols: 70, plantedRank: 70, decay: 0.8, seed: 4).rows(0..<90)
        let full = try g.singularValueDecomposition()
        let rank = 4
        // U with its columns r..<2r replaced by 0..<r: B = U[:, 0:r] alongside A = Vᵀ[0:r].
        var u = full.u.columns(0..<(2 * rank))
        for i in 0..<u.rows { for j in rank..<(2 * rank) { u[i, j] = full.u[i, j - rank] } }
        let swapped = TruncatedSVD(u: u, s: Array(full.s.prefix(2 * rank)), vt: full.vt.rows(0..<(2 * rank)))
        let s = try g.exactSingularValues()
        let squares = s.map { $0 * $0 }
        let top = squares.prefix(rank).reduce(0, +)
        let expected = (squares.dropFirst(rank).reduce(0, +) + top).squareRoot() / squares.dropFirst(2 * rank).reduce(0, +).squareRoot()
        #expect(expected > 1.5, "the planted spectrum makes the swap clearly worse")
        let measured = try ratio(swapped, g, rank: rank)
        #expect(abs(measured - expected) <= 1e-3 * expected, "ratio \(measured), expected \(expected)")
    }

    @Test func streamingFidelityMatchesTheDirectResidual() throws {
        let g = try PlantedGradient(rows: 120, cols: 80, plantedRank: 80, decay: 0.3, seed: 6).rows(0..<120)
        var source = InMemoryRowBlocks(g)
        let svd = try randomizedSVD(of: &source, parameters: .init(targetRank: 8, oversampling: 2, passes: 2, seed: 1), layerName: "l")
        let factors = LoRAFactors(svd: svd, configuration: .init(rank: 4, alpha: 8))
        var onePass = try FidelityAccumulator(factors: factors)
        var twoPass = try FidelityAccumulator(factors: factors)
        try InMemoryRowBlocks(g, blockRows: 33).forEachRowBlock { onePass.add($0); twoPass.add($0) }
        try InMemoryRowBlocks(g, blockRows: 33).forEachRowBlock { twoPass.addResidual($0) }
        #expect(abs(onePass.residualNorm - twoPass.residualNorm) <= 1e-3 * twoPass.residualNorm)
        #expect(!onePass.expansionIsInaccurate, "a heavy tail needs no direct pass")
    }

    @Test("a residual below 1 % of ‖G‖² is summed directly, in a second pass")
    func tinyResidualTakesTheDirectPass() throws {
        // Rank 8 plus noise of ~1e-4 of its energy: LoRA-GA's rank-2r residual is nearly all noise.
        let low = try PlantedGradient(rows: 120, cols: 80, plantedRank: 8, decay: 0.3, seed: 7).rows(0..<120)
        let noise = try PlantedGradient(rows: 120, cols: 80, plantedRank: 80, decay: 0, seed: 8).rows(0..<120)
        let g = Matrix(rows: 120, cols: 80, storage: zip(low.storage, noise.storage).map { $0 + 0.01 * $1 })
        var source = InMemoryRowBlocks(g)
        let svd = try randomizedSVD(of: &source, parameters: .init(targetRank: 8, oversampling: 4, passes: 3, seed: 1), layerName: "l")
        let factors = LoRAFactors(svd: svd, configuration: .init(rank: 4, alpha: 8))
        var onePass = try FidelityAccumulator(factors: factors)
        try InMemoryRowBlocks(g).forEachRowBlock { onePass.add($0) }
        #expect(onePass.expansionIsInaccurate)
        var twoPass = onePass
        try InMemoryRowBlocks(g).forEachRowBlock { twoPass.addResidual($0) }
        #expect(!twoPass.expansionIsInaccurate)
        let tail = Fidelity.tailNorm(gradientNormSquared: twoPass.gradientNormSquared, topSingularValues: svd.s.map(Double.init))
        let direct = Fidelity.ratio(residualNorm: twoPass.residualNorm, tailNorm: tail, gradientNorm: twoPass.gradientNormSquared.squareRoot())
        var blocks = InMemoryRowBlocks(g)
        #expect(try estimatedFidelity(of: &blocks, svd: svd, factors: factors) == direct)
    }
}

@Suite struct LoRAGAFactorTests {
    func svd() -> TruncatedSVD {
        // U = I (6×4), Vt = I (4×5), s = 4,3,2,1: every factor entry is predictable.
        var u = Matrix(rows: 6, cols: 4), vt = Matrix(rows: 4, cols: 5)
        for i in 0..<4 { u[i, i] = 1; vt[i, i] = 1 }
        return TruncatedSVD(u: u, s: [4, 3, 2, 1], vt: vt)
    }

    @Test func arb2rTakesTopRRightAndNextRLeftVectorsWithStableScale() {
        let config = LoRAConfiguration(rank: 2, alpha: 16, direction: .ArB2r, scale: .stable(gamma: 16))
        let f = LoRAFactors(svd: svd(), configuration: config)
        let c = Float(pow(6.0, 0.25) / 4)
        #expect(f.a.rows == 2 && f.a.cols == 5 && f.b.rows == 6 && f.b.cols == 2)
        #expect(abs(f.a[0, 0] - c) < 1e-6 && abs(f.a[1, 1] - c) < 1e-6 && f.a[0, 2] == 0)
        #expect(abs(f.b[2, 0] - c) < 1e-6 && abs(f.b[3, 1] - c) < 1e-6 && f.b[0, 0] == 0)
    }

    @Test func a2rbrSwapsTheRoles() {
        let f = LoRAFactors(svd: svd(), configuration: .init(rank: 2, alpha: 16, direction: .A2rBr, scale: .unit))
        #expect(f.b[0, 0] == 1 && f.b[1, 1] == 1)
        #expect(f.a[0, 2] == 1 && f.a[1, 3] == 1)
    }

    @Test func scalesFollowTheReference() {
        let plain = LoRAConfiguration(rank: 4, alpha: 16, scale: .gd)
        #expect(plain.scaling == 4)
        #expect(plain.factorScale(outFeatures: 100) == 0.25)
        let rs = LoRAConfiguration(rank: 4, alpha: 16, useRSLoRA: true, scale: .gd)
        #expect(rs.scaling == 8)
        #expect(LoRAConfiguration(rank: 4, alpha: 16, scale: .unit).factorScale(outFeatures: 100) == 1)
        #expect(abs(LoRAConfiguration(rank: 4, alpha: 16, scale: .stable(gamma: 4)).factorScale(outFeatures: 16) - 1) < 1e-12)
    }
}
