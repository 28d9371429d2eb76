import ArgumentParser
import LoRAGACore
import LoRAGAFormats

extension SVDMode: ExpressibleByArgument {}
extension LoRAGADirection: ExpressibleByArgument {}

enum ScaleName: String, ExpressibleByArgument, CaseIterable {
    case stable, unit, gd
}

enum AdapterDType: String, ExpressibleByArgument, CaseIterable {
    case f32, bf16, f16
    var tensorDType: TensorDType {
        switch self {
        case .f32: .f32
        case .bf16: .bf16
        case .f16: .f16
        }
    }
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

    @Option(help: "γ of the stable scale.")
    var gamma: Double = 16

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

    var settings: JobSettings {
        let scale: LoRAGAScale
        switch self.scale {
        case .stable: scale = .stable(gamma: gamma)
        case .unit: scale = .unit
        case .gd: scale = .gd
        }
        let lora = LoRAConfiguration(rank: rank, alpha: alpha ?? Double(2 * rank), useRSLoRA: rslora, direction: direction, scale: scale)
        return JobSettings(lora: lora, mode: mode, oversampling: oversampling, passes: passes, sketchWidth: sketchWidth, seed: seed)
    }

    func validate() throws {
        let problems = settings.validationErrors()
        if !problems.isEmpty { throw ValidationError(problems.joined(separator: "\n")) }
    }
}
