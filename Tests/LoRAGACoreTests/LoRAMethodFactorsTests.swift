import Foundation
import Testing
@testable import LoRAGACore

/// LoRA-One's factors, PEFT's LoRA-GA convention and fan_in_fan_out layers, each against a
/// reference computed here from an exactly known or LAPACK-computed decomposition.
@Suite struct LoRAMethodFactorsTests {
    /// G = U diag(s) Vᵀ with orthonormal U (8×4) and V (6×4) made by QR of fixed matrices.
    func knownSVD() throws -> (svd: TruncatedSVD, g: Matrix) {
        let u = try Matrix(rows: 8, cols: 4, storage: (0..<32).map { Float(sin(Double($0) * 1.3 + 0.2)) }).orthonormalizedColumns()
        let v = try Matrix(rows: 6, cols: 4, storage: (0..<24).map { Float(cos(Double($0) * 0.7 - 0.4)) }).orthonormalizedColumns()
        let s: [Float] = [4, 2, 1, 0.5]
        var us = u
        us.scaleColumns(by: s)
        return (TruncatedSVD(u: u, s: s, vt: v.transposed()), Matrix.product(us, v, transposeB: true))
    }

    /// The best rank-r approximation of G from its decomposition, in Double.
    func truncated(_ svd: TruncatedSVD, rank r: Int) -> [[Double]] {
        (0..<svd.u.rows).map { i in
            (0..<svd.vt.cols).map { j in (0..<r).reduce(0.0) { $0 + Double(svd.u[i, $1]) * Double(svd.s[$1]) * Double(svd.vt[$1, j]) } }
        }
    }

    func product(_ factors: LoRAFactors) -> Matrix { Matrix.product(factors.b, factors.a) }

    @Test("LoRA-One: B = −U_r·diag(√S_r)/√(σ₁γ), A = diag(√S_r)·V_rᵀ/√(σ₁γ), so B·A = −G_r/(σ₁γ)")
    func loraOneExact() throws {
        let (svd, _) = try knownSVD()
        let gamma = 128.0
        let lora = LoRAConfiguration(rank: 2, alpha: 4, scale: .stable(gamma: gamma), method: .loraOne)
        let factors = LoRAFactors(svd: svd, configuration: lora)
        #expect(factors.a.rows == 2 && factors.a.cols == 6 && factors.b.rows == 8 && factors.b.cols == 2)
        let norm = 1 / (4 * gamma).squareRoot()
        for k in 0..<2 {
            let root = Double(svd.s[k]).squareRoot() * norm
            for i in 0..<8 { #expect(abs(Double(factors.b[i, k]) + Double(svd.u[i, k]) * root) < 1e-6) }
            for j in 0..<6 { #expect(abs(Double(factors.a[k, j]) - Double(svd.vt[k, j]) * root) < 1e-6) }
        }
        let reference = truncated(svd, rank: 2)
        let ba = product(factors)
        for i in 0..<8 {
            for j in 0..<6 { #expect(abs(Double(ba[i, j]) + reference[i][j] / (4 * gamma)) < 1e-6) }
        }
    }

    @Test("LoRA-One through a dense job matches −G_r/(σ₁γ) from LAPACK's SVD, whatever G's scale")
    func loraOneDenseJob() throws {
        let planted = try PlantedGradient(rows: 48, cols: 40, plantedRank: 20, decay: 0.8, seed: 7)
        var g = planted.rows(0..<48)
        g.scale(by: 37)  // LoRA-One is invariant to the gradient's overall scale
        // Enough power iterations that the randomized SVD is exact to float precision here.
        let settings = JobSettings(lora: LoRAConfiguration(rank: 3, alpha: 6, scale: .stable(gamma: 128), method: .loraOne), mode: .dense, passes: 16)
        var accumulator = try LayerAccumulator(name: "layer", rows: 48, cols: 40, settings: settings)
        g.storage.withUnsafeBufferPointer { accumulator.add(RowBlock(rowStart: 0, rowCount: 48, cols: 40, values: $0)) }
        let factors = try accumulator.finish(settings: settings).factors
        let exact = try g.singularValueDecomposition()
        let reference = truncated(TruncatedSVD(u: exact.u, s: exact.s, vt: exact.vt), rank: 3)
        let sigma1 = Double(exact.s[0])
        let ba = product(factors)
        var error = 0.0, size = 0.0
        for i in 0..<48 {
            for j in 0..<40 {
                let want = -reference[i][j] / (sigma1 * 128)
                error += pow(Double(ba[i, j]) - want, 2)
                size += want * want
            }
        }
        #expect((error / size).squareRoot() < 1e-3, "relative error \((error / size).squareRoot())")
    }

    @Test("PEFT convention: A = Vᵀ[0:r] unscaled, B = U[:, r:2r]·diag(S/N)·out^¼/√γ")
    func peftConvention() throws {
        let (svd, _) = try knownSVD()
        let lora = LoRAConfiguration(rank: 2, alpha: 4, scale: .stable(gamma: 16), convention: .peft, microBatches: 4)
        let factors = LoRAFactors(svd: svd, configuration: lora)
        let c = pow(8.0, 0.25) / 4
        for k in 0..<2 {
            for j in 0..<6 { #expect(abs(Double(factors.a[k, j]) - Double(svd.vt[k, j])) < 1e-6) }
            let scale = Double(svd.s[2 + k]) / 4 * c
            for i in 0..<8 { #expect(abs(Double(factors.b[i, k]) - Double(svd.u[i, 2 + k]) * scale) < 1e-6) }
        }
    }

    @Test("fan_in_fan_out: factors of the stored [in, out] gradient are the transposed factors of G")
    func fanInFanOut() throws {
        let (svd, _) = try knownSVD()  // G is 8×6; stored as Gᵀ (6×8) with decomposition V S Uᵀ
        let stored = TruncatedSVD(u: svd.vt.transposed(), s: svd.s, vt: svd.u.transposed())
        for method in LoRAMethod.allCases {
            let plain = LoRAConfiguration(rank: 2, alpha: 4, method: method)
            var transposed = plain
            transposed.fanInFanOut = true
            let g = LoRAFactors(svd: svd, configuration: plain)
            let t = LoRAFactors(svd: stored, configuration: transposed)
            #expect(t.a.rows == 2 && t.a.cols == 8 && t.b.rows == 6 && t.b.cols == 2)
            #expect(t.a == g.b.transposed() && t.b == g.a.transposed(), "\(method)")
        }
    }

    @Test("manifests written before the method existed decode as reference LoRA-GA")
    func oldManifest() throws {
        let json = #"{"rank":8,"alpha":16,"useRSLoRA":false,"direction":"ArB2r","scale":{"stable":{"gamma":16}}}"#
        let lora = try JSONDecoder().decode(LoRAConfiguration.self, from: Data(json.utf8))
        #expect(lora == LoRAConfiguration(rank: 8, alpha: 16))
        let roundTrip = try JSONDecoder().decode(LoRAConfiguration.self, from: JSONEncoder().encode(LoRAConfiguration(rank: 4, alpha: 8, method: .loraOne, microBatches: 3)))
        #expect(roundTrip.method == .loraOne && roundTrip.microBatches == 3)
    }

    @Test("LoRA-One refuses the PEFT convention and non-stable scales")
    func validation() {
        var lora = LoRAConfiguration(rank: 2, alpha: 4, method: .loraOne, convention: .peft)
        #expect(!JobSettings(lora: lora).validationErrors().isEmpty)
        lora.convention = .reference
        #expect(JobSettings(lora: lora).validationErrors().isEmpty)
        lora.scale = .unit
        #expect(!JobSettings(lora: lora).validationErrors().isEmpty)
    }
}
