import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGACoordinator
import LoRAGAFormats
import LoRAGADaemon

struct InspectCommand: ParsableCommand, LoggingCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a job directory's checkpoints, or what gradient files hold: layers, blocks, coverage.",
        discussion: """
            Given a job's output directory: every checkpoint is read and checked (CRC-32C of its \
            content against the manifest, the layer it names, shapes, decompression); exits 3 if any \
            finished layer is corrupt, missing or belongs to another layer.

            Given gradient files or directories: every layer's shape, dtype, whole-layer and block \
            contributions ("lora_ga.blocks" metadata, with each block's rows and columns) and \
            coverage; exits 3 if some layer has entries no file covers.
            """)

    @Option(help: "Gradient files only: regular expression selecting layers by tensor name.")
    var target: String?

    @Argument(help: "The job's output directory (or its checkpoints/ folder), or gradient files and directories.")
    var paths: [String]

    @OptionGroup var logging: LogOptions

    func run() throws {
        if paths.count == 1, Self.isJobDirectory(paths[0]) {
            let inspection = try CheckpointInspection(directory: paths[0])
            print(inspection.report())
            if inspection.layers.contains(where: { $0.state == .corrupt || $0.state == .missing }) { throw ExitCode(JobError.Kind.badInput.exitCode) }
            return
        }
        let files = try GradientFileSet(paths: paths, target: target, uncovered: .zero)
        print(files.report())
        if !files.uncoveredLayers.isEmpty { throw ExitCode(JobError.Kind.badInput.exitCode) }
    }

    /// A lora-ga output directory (it has checkpoints/) or its checkpoints/ folder.
    static func isJobDirectory(_ path: String) -> Bool {
        let trimmed = path.hasSuffix("/") ? String(path.dropLast()) : path
        var isDirectory: ObjCBool = false
        if (trimmed as NSString).lastPathComponent == "checkpoints" { return true }
        return FileManager.default.fileExists(atPath: (trimmed as NSString).appendingPathComponent("checkpoints"), isDirectory: &isDirectory) && isDirectory.boolValue
    }
}

struct ExportCommand: ParsableCommand, LoggingCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a PEFT adapter from a job's checkpoints (also from a partial job: its finished layers).")

    @Argument(help: "The job's output directory (or its checkpoints/ folder).")
    var directory: String

    @Option(name: .shortAndLong, help: "Directory for adapter_model.safetensors and adapter_config.json.")
    var out: String

    @Option(help: "dtype of the adapter tensors: f32, bf16 or f16.")
    var dtype: TensorDType = .f32

    @OptionGroup var logging: LogOptions

    func run() throws {
        let inspection = try CheckpointInspection(directory: directory)
        let lock = try OutputLock(directory: out, purpose: "lora-ga export")
        let count = try inspection.export(to: out, dtype: dtype)
        withExtendedLifetime(lock) {}
        log("exported \(count) of \(inspection.layers.count) layers to \(out)")
    }
}
