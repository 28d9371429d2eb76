import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGADaemon

struct VerifyCommand: CatalogCommand {
    static let schema = SettingsCatalog.verifyCommand
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Measure an adapter's LoRA-GA fidelity exactly against the gradient files.",
        usage: usage,
        discussion: discussion("""
            ratio = ‖P_B G + G P_A − G‖_F / ‖G − G_2r‖_F per layer (optimum 1.0), where G is the \
            exact sum of the files. The optimum uses a planted-spectrum.json found in (or next to) \
            the given paths for synthetic gradients, else a double-precision SVD of the layer. \
            Exits 1 when the worst layer is above --threshold.
            """))

    /// Every setting is declared in ``SettingsCatalog/verifyCommand``; it parses them.
    @Argument(parsing: .allUnrecognized, help: .hidden) var arguments: [String] = []

    func run(_ resolved: ResolvedSettings) throws {
        let adapter: String = try resolved.required("adapter")
        let threshold: Double = try resolved.required("threshold")
        let paths = try resolved.gradientPaths()
        let files = try GradientFileSet(paths: paths, target: try resolved.value("target"),
                                        uncovered: try resolved.flag("allow-uncovered") ? .zero : .refused)
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
