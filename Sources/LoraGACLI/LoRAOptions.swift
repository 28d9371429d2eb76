import ArgumentParser
import LoRAGACore
import LoRAGAFormats

extension SVDMode: ExpressibleByArgument {}
extension LoRAGADirection: ExpressibleByArgument {}
extension LoRAMethod: ExpressibleByArgument {}
extension FactorConvention: ExpressibleByArgument {}

enum ScaleName: String, ExpressibleByArgument, CaseIterable {
    case stable, unit, gd
}

// Every dtype option of the CLI names data written from Float (adapters, files, shards).
extension TensorDType: ExpressibleByArgument {
    public init?(argument: String) {
        guard let dtype = TensorDType(argument), dtype.isWritableFromFloat else { return nil }
        self = dtype
    }
    public static var allValueStrings: [String] { writableCases.map(\.safetensorsName) }
    public static var allValueDescriptions: [String: String] { [:] }
}

/// The LoRA-GA and randomized-SVD options shared by every command that computes factors.
struct LoRAOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: "LoRA rank r; LoRA-GA uses the top 2r singular directions.")
    var rank: Int = 8

    @Option(help: "LoRA alpha (default: 2 × rank, as in the LoRA-GA paper's r = 8, alpha = 16).")
    var alpha: Double?

    @Flag(help: "rsLoRA scaling alpha / √r instead of alpha / r.")
    var rslora = false

    @Option(help: "Which directions go where: ArB2r (A = top r right vectors, B = next r left vectors) or A2rBr.")
    var direction: LoRAGADirection = .ArB2r

    @Option(help: "Factor scale: stable (out^¼ / √gamma), unit, or gd (1 / scaling).")
    var scale: ScaleName = .stable

    @Option(help: "lora-ga: A and B from the top 2r singular directions, the base must be offset by scaling·B·A (lora_ga.attach does it); lora-one: B·A = −G_r/(σ₁γ) from the top r, the base is used as is.")
    var method: LoRAMethod = .loraGA

    @Option(help: "γ: of the stable scale for lora-ga (default 16); LoRA-One's 1/√(σ₁γ) for lora-one (default 128).")
    var gamma: Double?

    @Option(help: "lora-ga factor formulas: reference (the LoRA-GA code's) or peft (PEFT's init_lora_weights=\"lora_ga\": B = U·diag(S)·c from the gradient averaged over micro-batches, A unscaled).")
    var convention: FactorConvention = .reference

    @Option(help: "Micro-batches summed into the gradient files, for --convention peft (default: the sum of the files' \"micro_batches\" metadata).")
    var microBatches: Int?

    @Flag(help: "The gradient tensors are stored [in, out] (GPT-2's Conv1D): factor their transpose and write an adapter with fan_in_fan_out = true.")
    var fanInFanOut = false

    @Option(help: "power (default): re-read the gradient in row blocks, two passes per read (memory (out+in)·k); dense: hold each layer's sum and read it once (memory out·in); sketch: one streamed pass into sketches (memory (out+in)·k, less exact).")
    var mode: SVDMode = .power

    @Option(help: "Oversampling p (dense, power): sketch width k = 2r + p. Default r + min(r, 16): 2r up to r = 16, then r + 16.")
    var oversampling: Int?

    @Option(help: "Applications of G or Gᵀ (dense, power), at least 2. Default \(SVDDefaults.passes).")
    var passes: Int?

    @Option(help: "Sketch width k for --mode sketch. Default 4r + 128; memory ≈ 4·(out+in)·(3k+1) bytes, and wider is closer to the optimum.")
    var sketchWidth: Int?

    @Option(help: "Seed of the random test matrices.")
    var seed: UInt64 = SVDDefaults.seed

    var settings: JobSettings { settings(microBatches: microBatches ?? 1) }

    func settings(microBatches: Int) -> JobSettings {
        let gamma = self.gamma ?? method.defaultGamma
        let scale: LoRAGAScale
        switch self.scale {
        case .stable: scale = .stable(gamma: gamma)
        case .unit: scale = .unit
        case .gd: scale = .gd
        }
        let lora = LoRAConfiguration(rank: rank, alpha: alpha ?? Double(2 * rank), useRSLoRA: rslora, direction: direction, scale: scale,
                                     method: method, convention: convention, microBatches: microBatches, fanInFanOut: fanInFanOut)
        return JobSettings(lora: lora, mode: mode, oversampling: oversampling, passes: passes, sketchWidth: sketchWidth, seed: seed)
    }

    /// The micro-batch count --convention peft divides by: --micro-batches, else the sum of the
    /// files' "micro_batches" metadata (data-parallel ranks' files add, as their gradients do).
    func resolvedMicroBatches(files: [SafeTensorsFile]) throws -> Int {
        if let microBatches { return microBatches }
        guard convention == .peft else { return 1 }
        // A sharded recording stores the job's total in every file (tensor-parallel ranks share
        // batches, so their own counts would add up to too many).
        let totals = Set(files.compactMap { $0.metadata["micro_batches_total"].flatMap { Int($0) } })
        if let total = totals.first, totals.count == 1, total > 0 { return total }
        var total = 0
        for file in files {
            guard let text = file.metadata["micro_batches"], let count = Int(text), count > 0 else {
                throw ValidationError("\(file.path) has no \"micro_batches\" metadata; --convention peft needs the micro-batch count: give --micro-batches N")
            }
            total += count
        }
        return max(total, 1)
    }

    func validate() throws {
        let problems = settings.validationErrors()
        if !problems.isEmpty { throw ValidationError(problems.joined(separator: "\n")) }
    }
}
