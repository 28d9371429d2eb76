import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator

struct VerifyCommand: ParsableCommand, LoggingCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Measure an adapter's LoRA-GA fidelity exactly against the gradient files.",
        discussion: """
            ratio = ‖P_B G + G P_A − G‖_F / ‖G − G_2r‖_F per layer (optimum 1.0), where G is the \
            exact sum of the files. The optimum uses a planted-spectrum.json found in (or next to) \
            the given paths for synthetic gradients, else a double-precision SVD of the layer. \
            Exits 1 when the worst layer is above --threshold.
            """)

    @Option(help: "Adapter directory (holding adapter_model.safetensors).")
    var adapter: String

    @Option(help: "Largest acceptable ratio.")
    var threshold: Double = 1.01

    @Option(help: "Regular expression selecting layers by tensor name.")
    var target: String?

    @Flag(help: "Count entries of a layer that no gradient file covers (blocks leaving a hole) as zeros instead of refusing the layer.")
    var allowUncovered = false

    @Argument(help: "The gradient files or directories the adapter was computed from.")
    var paths: [String]

    @OptionGroup var logging: LogOptions

    func run() throws {
        let files = try GradientFileSet(paths: paths, target: target, uncovered: allowUncovered ? .zero : .refused)
        var spectrumPaths: [String] = []
        for path in paths {
            spectrumPaths.append((path as NSString).appendingPathComponent(PlantedSpectrumFile.fileName))
            spectrumPaths.append(((path as NSString).deletingLastPathComponent as NSString).appendingPathComponent(PlantedSpectrumFile.fileName))
        }
        let verifier = try AdapterVerifier(files: files, adapterDirectory: adapter, plantedSpectrumPaths: spectrumPaths)
        let results = try verifier.verify { result in
            print(String(format: "%-60@ ratio %.5f  (residual %.6g, optimum %.6g, %@)", result.name as NSString, result.ratio, result.residual, result.optimum, result.spectrumSource as NSString))
        }
        let worst = results.max { $0.ratio < $1.ratio }!
        print(String(format: "worst: %.5f (%@) over %d layers; threshold %.4f", worst.ratio, worst.name as NSString, results.count, threshold))
        if worst.ratio > threshold {
            throw ExitCode(1)
        }
    }
}
