import Foundation

/// Which singular directions go to which factor (DESIGN.md §1; names as in the reference code).
public enum LoRAGADirection: String, Sendable, CaseIterable, Codable {
    /// lora_A = Vᵀ[0:r], lora_B = U[:, r:2r] — the reference default.
    case ArB2r
    /// lora_B = U[:, 0:r], lora_A = Vᵀ[r:2r].
    case A2rBr
}

/// How both factors are scaled after taking singular vectors.
public enum LoRAGAScale: Sendable, Equatable, Codable, CustomStringConvertible {
    /// c = out^(1/4) / √γ: keeps the output scale independent of width (reference default, γ = 16).
    case stable(gamma: Double)
    /// Orthonormal factors as they are.
    case unit
    /// Divide each factor by the LoRA scaling, so the first step equals a gradient-descent step.
    case gd

    public var description: String {
        switch self {
        case .stable(let gamma): return "stable(gamma=\(gamma))"
        case .unit: return "unit"
        case .gd: return "gd"
        }
    }

    public var name: String {
        switch self {
        case .stable: return "stable"
        case .unit: return "unit"
        case .gd: return "gd"
        }
    }
}

/// The LoRA hyper-parameters a LoRA-GA initialization depends on.
public struct LoRAConfiguration: Sendable, Equatable, Codable {
    public var rank: Int
    public var alpha: Double
    public var useRSLoRA: Bool
    public var direction: LoRAGADirection
    public var scale: LoRAGAScale

    public init(rank: Int, alpha: Double, useRSLoRA: Bool = false, direction: LoRAGADirection = .ArB2r, scale: LoRAGAScale = .stable(gamma: 16)) {
        self.rank = rank
        self.alpha = alpha
        self.useRSLoRA = useRSLoRA
        self.direction = direction
        self.scale = scale
    }

    /// PEFT's scaling: alpha / r, or alpha / √r with rsLoRA.
    public var scaling: Double {
        useRSLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank)
    }

    /// The factor c applied to both lora_A and lora_B for a layer with `outFeatures` rows.
    public func factorScale(outFeatures: Int) -> Double {
        switch scale {
        case .stable(let gamma): return pow(Double(outFeatures), 0.25) / gamma.squareRoot()
        case .unit: return 1
        case .gd: return 1 / scaling
        }
    }
}

/// A layer's LoRA-GA initialization: lora_A [r × in], lora_B [out × r]. The training job
/// offsets the frozen weight by `scaling · B · A` so the model is unchanged at step 0.
public struct LoRAFactors: Sendable, Equatable {
    public var a: Matrix
    public var b: Matrix

    /// Builds the factors from the top-2r singular triplets of the gradient.
    public init(svd: TruncatedSVD, configuration: LoRAConfiguration) {
        let r = configuration.rank
        precondition(svd.rank >= 2 * r, "LoRA-GA at rank \(r) needs 2r = \(2 * r) singular triplets, have \(svd.rank)")
        let c = Float(configuration.factorScale(outFeatures: svd.u.rows))
        switch configuration.direction {
        case .ArB2r:
            a = svd.vt.rows(0..<r)
            b = svd.u.columns(r..<(2 * r))
        case .A2rBr:
            a = svd.vt.rows(r..<(2 * r))
            b = svd.u.columns(0..<r)
        }
        a.scale(by: c)
        b.scale(by: c)
    }

    public init(a: Matrix, b: Matrix) {
        precondition(a.rows == b.cols, "lora_A has \(a.rows) rows but lora_B has \(b.cols) columns")
        self.a = a
        self.b = b
    }
}
