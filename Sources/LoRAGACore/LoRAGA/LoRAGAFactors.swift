import Foundation

/// Which singular directions go to which factor (names as in the reference code; see “LoRA-GA”
/// in the LoRAGACore article).
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

/// Which initialization the top singular triplets of the gradient become.
public enum LoRAMethod: String, Sendable, CaseIterable, Codable {
    /// LoRA-GA (Wang et al. 2024): A and B from disjoint singular directions; the training job
    /// must offset the base by scaling · B · A so the model is unchanged at step 0.
    case loraGA = "lora-ga"
    /// LoRA-One (Zhang et al., ICML 2025): B·A = −G_r / (σ₁γ), one rank-r gradient step taken
    /// at step 0 on purpose, so the base is used as it is.
    case loraOne = "lora-one"

    /// Whether training must start from W − scaling · B · A.
    public var needsBaseOffset: Bool { self == .loraGA }

    /// γ when none is given: LoRA-GA's stable scale uses 16, LoRA-One's paper 128.
    public var defaultGamma: Double { self == .loraOne ? 128 : 16 }
}

/// Whose formulas turn singular triplets into factors (LoRA-GA only; LoRA-One has one).
public enum FactorConvention: String, Sendable, CaseIterable, Codable {
    /// The reference implementation's: orthonormal A and B, both scaled by c.
    case reference
    /// PEFT's `init_lora_weights="lora_ga"`: A = Vᵀ rows unscaled, B = U columns · diag(S) · c,
    /// with G the gradient averaged over micro-batches and c's `out` the stored weight's first
    /// dimension (the input width for a Conv1D weight stored [in, out]).
    case peft
}

// Flags and settings files spell these as their raw values.
extension LoRAGADirection: LosslessStringConvertible {
    public init?(_ text: String) { self.init(rawValue: text) }
    public var description: String { rawValue }
}

extension LoRAMethod: LosslessStringConvertible {
    public init?(_ text: String) { self.init(rawValue: text) }
    public var description: String { rawValue }
}

extension FactorConvention: LosslessStringConvertible {
    public init?(_ text: String) { self.init(rawValue: text) }
    public var description: String { rawValue }
}

/// The LoRA hyper-parameters a LoRA-GA initialization depends on.
public struct LoRAConfiguration: Sendable, Equatable, Codable {
    public var rank: Int
    public var alpha: Double
    public var useRSLoRA: Bool
    public var direction: LoRAGADirection
    /// LoRA-GA's factor scale; for LoRA-One only its γ is used (`.stable(gamma:)`).
    public var scale: LoRAGAScale
    public var method: LoRAMethod
    public var convention: FactorConvention
    /// Micro-batches the summed gradient holds; the PEFT convention divides G by it (PEFT
    /// averages), the others are unchanged by G's scale.
    public var microBatches: Int
    /// The gradient tensors are stored [in, out] like GPT-2's Conv1D weights: the factors are
    /// those of their transpose, written in PEFT's orientation with `fan_in_fan_out: true`.
    public var fanInFanOut: Bool

    public init(rank: Int, alpha: Double, useRSLoRA: Bool = false, direction: LoRAGADirection = .ArB2r, scale: LoRAGAScale = .stable(gamma: 16),
                method: LoRAMethod = .loraGA, convention: FactorConvention = .reference, microBatches: Int = 1, fanInFanOut: Bool = false) {
        self.rank = rank
        self.alpha = alpha
        self.useRSLoRA = useRSLoRA
        self.direction = direction
        self.scale = scale
        self.method = method
        self.convention = convention
        self.microBatches = microBatches
        self.fanInFanOut = fanInFanOut
    }

    private enum CodingKeys: String, CodingKey {
        case rank, alpha, useRSLoRA, direction, scale, method, convention, microBatches, fanInFanOut
    }

    /// Manifests written before the method existed describe reference LoRA-GA jobs.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        rank = try container.decode(Int.self, forKey: .rank)
        alpha = try container.decode(Double.self, forKey: .alpha)
        useRSLoRA = try container.decode(Bool.self, forKey: .useRSLoRA)
        direction = try container.decode(LoRAGADirection.self, forKey: .direction)
        scale = try container.decode(LoRAGAScale.self, forKey: .scale)
        method = try container.decodeIfPresent(LoRAMethod.self, forKey: .method) ?? .loraGA
        convention = try container.decodeIfPresent(FactorConvention.self, forKey: .convention) ?? .reference
        microBatches = try container.decodeIfPresent(Int.self, forKey: .microBatches) ?? 1
        fanInFanOut = try container.decodeIfPresent(Bool.self, forKey: .fanInFanOut) ?? false
    }

    /// The γ in use: the stable scale's, else the method's default.
    public var gamma: Double {
        if case .stable(let gamma) = scale { return gamma }
        return method.defaultGamma
    }

    /// PEFT's scaling: alpha / r, or alpha / √r with rsLoRA.
    public var scaling: Double {
        useRSLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank)
    }

    /// PEFT's c: out^¼/√γ for stable with `out` = the stored weight's first dimension, else 1
    /// (its gd divides B by the scaling too; unit leaves B · diag(S)).
    public func peftFactorScale(storedRows: Int) -> Double {
        switch scale {
        case .stable(let gamma): return pow(Double(storedRows), 0.25) / gamma.squareRoot()
        case .unit: return 1
        case .gd: return 1 / scaling
        }
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

/// A layer's initialization: lora_A [r × in], lora_B [out × r], in the orientation of the
/// gradient tensor (so for `fanInFanOut` lora_A is [r × out] and lora_B [in × r]: B · A has the
/// stored weight's shape). For LoRA-GA the training job offsets the frozen weight by
/// `scaling · B · A` so the model is unchanged at step 0.
public struct LoRAFactors: Sendable, Equatable {
    public var a: Matrix
    public var b: Matrix

    /// Builds the factors from the top singular triplets of the gradient as stored
    /// (2r for LoRA-GA, r for LoRA-One).
    public init(svd stored: TruncatedSVD, configuration: LoRAConfiguration) {
        let r = configuration.rank
        // G in PyTorch's [out, in] orientation: a stored [in, out] tensor is Gᵀ = U S Vᵀ, so G = V S Uᵀ.
        let svd = configuration.fanInFanOut ? TruncatedSVD(u: stored.vt.transposed(), s: stored.s, vt: stored.u.transposed()) : stored
        var a: Matrix
        var b: Matrix
        switch configuration.method {
        case .loraOne:
            precondition(svd.rank >= r, "LoRA-One at rank \(r) needs \(r) singular triplets, have \(svd.rank)")
            (a, b) = LoRAFactors.loraOne(svd: svd, rank: r, gamma: configuration.gamma)
        case .loraGA:
            precondition(svd.rank >= 2 * r, "LoRA-GA at rank \(r) needs 2r = \(2 * r) singular triplets, have \(svd.rank)")
            let (first, second) = (0..<r, r..<(2 * r))
            let (aRows, bColumns) = configuration.direction == .ArB2r ? (first, second) : (second, first)
            a = svd.vt.rows(aRows)
            b = svd.u.columns(bColumns)
            switch configuration.convention {
            case .reference:
                let c = Float(configuration.factorScale(outFeatures: svd.u.rows))
                a.scale(by: c)
                b.scale(by: c)
            case .peft:
                // PEFT: B · diag(S_B) · c on the averaged gradient, A unscaled except by 1/scaling for gd.
                let c = configuration.peftFactorScale(storedRows: stored.u.rows)
                let divisor = Double(max(configuration.microBatches, 1))
                let singular = bColumns.map { Double(svd.s[$0]) / divisor }
                b.scaleColumns(by: singular.map { Float($0 * c) })
                if case .gd = configuration.scale { a.scale(by: Float(1 / configuration.scaling)) }
            }
        }
        if configuration.fanInFanOut {
            // Back to the stored orientation: (b_G a_G)ᵀ = a_Gᵀ b_Gᵀ.
            (a, b) = (b.transposed(), a.transposed())
        }
        self.a = a
        self.b = b
    }

    /// LoRA-One from G = U S Vᵀ: −G = (−U) S Vᵀ, so B = −U_r·diag(√S_r)/√(σ₁γ) and
    /// A = diag(√S_r)·V_rᵀ/√(σ₁γ), giving B·A = −G_r / (σ₁γ) (invariant to G's overall scale).
    static func loraOne(svd: TruncatedSVD, rank r: Int, gamma: Double) -> (a: Matrix, b: Matrix) {
        let sigma1 = Double(svd.s.first ?? 0)
        let norm = sigma1 > 0 ? 1 / (sigma1 * gamma).squareRoot() : 0
        let roots = (0..<r).map { Double(max(svd.s[$0], 0)).squareRoot() * norm }
        var a = svd.vt.rows(0..<r)
        var b = svd.u.columns(0..<r)
        a.scaleRows(by: roots.map { Float($0) })
        b.scaleColumns(by: roots.map { Float(-$0) })
        return (a, b)
    }

    public init(a: Matrix, b: Matrix) {
        precondition(a.rows == b.cols, "lora_A has \(a.rows) rows but lora_B has \(b.cols) columns")
        self.a = a
        self.b = b
    }
}
