import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGADaemon
import LoRAGAFormats

struct SynthCommand: ParsableCommand, LoggingCommand {
    static let configuration = CommandConfiguration(
        commandName: "synth",
        abstract: "Write gradient files with a planted spectrum (exact answer known without an SVD).",
        discussion: """
            Each layer's summed gradient is G = U·diag(s)·Vᵀ with random orthonormal U, V and \
            s_i = i^(−decay) for i = 1…planted-rank; worker w's file holds G/W + E_w, where the E_w \
            cancel in the sum. Writes OUT/w0/grads.safetensors … and OUT/planted-spectrum.json, \
            which `lora-ga verify` picks up. The planted answer is exact for F32; BF16/F16 files \
            add their rounding error to the sum.

            Example: lora-ga synth --out /tmp/big --shape 8192x28672 --workers 2
            """)

    @Option(name: .shortAndLong, help: "Output directory.")
    var out: String

    @Option(help: "Layer shape OUTxIN; repeat for several shapes (each becomes --layers layers).")
    var shape: [String] = ["1024x4096"]

    @Option(help: "Layers per shape.")
    var layers: Int = 1

    @Option(help: "Number of worker files the gradient is split into.")
    var workers: Int = 1

    @Option(help: "Decay exponent of the planted spectrum (real gradients: about 0.8).")
    var decay: Double = 0.8

    @Option(help: "Planted rank ρ (capped by the shape).")
    var plantedRank: Int = 512

    @Option(help: "dtype of the files: f32, bf16 or f16.")
    var dtype: TensorDType = .f32

    @Option(help: "Seed.")
    var seed: UInt64 = 1

    func validate() throws {
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
        guard layers >= 1 else { throw ValidationError("--layers must be at least 1") }
        guard plantedRank >= 1 else { throw ValidationError("--planted-rank must be at least 1") }
        _ = try parsedShapes()
    }

    func parsedShapes() throws -> [(Int, Int)] {
        try shape.map { text in
            let parts = text.lowercased().split(separator: "x")
            guard parts.count == 2, let rows = Int(parts[0]), let cols = Int(parts[1]), rows > 0, cols > 0 else {
                throw ValidationError("--shape '\(text)' is not OUTxIN with positive integers (e.g. 4096x11008)")
            }
            return (rows, cols)
        }
    }

    @OptionGroup var logging: LogOptions

    func run() throws {
        BLAS.configureThreads()
        var specs: [SyntheticGradients.LayerSpec] = []
        for (rows, cols) in try parsedShapes() {
            for _ in 0..<layers {
                specs.append(.init(name: "synthetic.layer.\(specs.count).\(rows)x\(cols).weight", rows: rows, cols: cols))
            }
        }
        let generator = SyntheticGradients(layers: specs, workers: workers, plantedRank: plantedRank, decay: decay, dtype: dtype, seed: seed)
        try generator.write(to: out, progress: log)
        log("wrote \(workers) worker file(s) with \(specs.count) layer(s) and \(PlantedSpectrumFile.fileName) to \(out)")
    }
}
