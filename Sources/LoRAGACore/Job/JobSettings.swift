/// Everything that decides a job's numbers. Two runs with equal settings on the same
/// gradients produce byte-identical adapters; a resumed job must match its manifest's.
public struct JobSettings: Sendable, Equatable, Codable {
    public var lora: LoRAConfiguration
    public var mode: SVDMode
    /// p in k = 2r + p (dense, power).
    public var oversampling: Int
    /// Applications of G / Gᵀ (dense, power), ≥ 2.
    public var passes: Int
    /// k for the single-pass sketch.
    public var sketchWidth: Int
    public var seed: UInt64

    public init(lora: LoRAConfiguration, mode: SVDMode = .power, oversampling: Int? = nil, passes: Int? = nil, sketchWidth: Int? = nil, seed: UInt64 = SVDDefaults.seed) {
        self.lora = lora
        self.mode = mode
        self.oversampling = oversampling ?? SVDDefaults.oversampling(rank: lora.rank)
        self.passes = passes ?? SVDDefaults.passes
        self.sketchWidth = sketchWidth ?? SVDDefaults.sketchWidth(rank: lora.rank)
        self.seed = seed
    }

    public var randomizedSVD: RandomizedSVDParameters {
        RandomizedSVDParameters(targetRank: 2 * lora.rank, oversampling: oversampling, passes: passes, seed: seed)
    }

    /// Problems a user can fix, stated in their words; empty when the settings are usable.
    public func validationErrors() -> [String] {
        var errors: [String] = []
        if lora.rank < 1 { errors.append("--rank must be at least 1 (got \(lora.rank))") }
        if !(lora.alpha > 0) { errors.append("--alpha must be positive (got \(lora.alpha))") }
        if passes < 2 { errors.append("--passes must be at least 2 (got \(passes))") }
        if oversampling < 0 { errors.append("--oversampling must be ≥ 0 (got \(oversampling))") }
        if sketchWidth < 2 * lora.rank { errors.append("--sketch-width must be ≥ 2r = \(2 * lora.rank) (got \(sketchWidth))") }
        if case .stable(let gamma) = lora.scale, !(gamma > 0) { errors.append("--gamma must be positive (got \(gamma))") }
        if lora.microBatches < 1 { errors.append("--micro-batches must be at least 1 (got \(lora.microBatches))") }
        if lora.method == .loraOne {
            if lora.convention == .peft { errors.append("--convention peft applies to lora-ga only (PEFT has no LoRA-One initialization)") }
            if case .stable = lora.scale {} else { errors.append("--scale applies to lora-ga only (LoRA-One's scale is 1/√(σ₁γ); set γ with --gamma)") }
        }
        return errors
    }
}

/// What a finished layer reports (the per-layer table of `lora_ga_report.json`).
public struct LayerReport: Sendable, Equatable, Codable {
    public var name: String
    public var outFeatures: Int
    public var inFeatures: Int
    public var mode: SVDMode
    /// The top 2r singular values found.
    public var singularValues: [Double]
    /// ‖P_B G + G P_A − G‖ / ‖G − G_2r‖ with an exact numerator and a denominator from the
    /// singular values found (so it reads slightly optimistic); nil when G was never whole
    /// or summed in one place (sketch, distributed power): use `lora-ga verify`.
    public var fidelityEstimate: Double?
    public var seconds: Double
    /// Gradient bytes read or received for this layer.
    public var bytesIn: Int
    /// Seconds inside the products with G's row blocks (the GEMMs; with `--estimate-fidelity`
    /// also that pass), when one process ran them over its files (`init` in power and sketch
    /// mode); `seconds` also holds waiting for the files to be read and summed.
    public var gemmSeconds: Double?

    public init(name: String, outFeatures: Int, inFeatures: Int, mode: SVDMode, singularValues: [Double], fidelityEstimate: Double?, seconds: Double, bytesIn: Int, gemmSeconds: Double? = nil) {
        self.name = name
        self.outFeatures = outFeatures
        self.inFeatures = inFeatures
        self.mode = mode
        self.singularValues = singularValues
        self.fidelityEstimate = fidelityEstimate
        self.seconds = seconds
        self.bytesIn = bytesIn
        self.gemmSeconds = gemmSeconds
    }
}
