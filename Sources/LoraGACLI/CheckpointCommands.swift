import ArgumentParser
import Foundation
import LoRAGACoordinator
import LoRAGADaemon

struct InspectCommand: ParsableCommand, LoggingCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a job directory's checkpoints: layers, shapes, state, sizes, compression, fidelity.",
        discussion: "Every checkpoint is read and checked (CRC-32C, shapes, decompression). Exits 3 (bad input) if any finished layer is corrupt or missing.")

    @Argument(help: "The job's output directory (or its checkpoints/ folder).")
    var directory: String

    @OptionGroup var logging: LogOptions

    func run() throws {
        let inspection = try CheckpointInspection(directory: directory)
        print(inspection.report())
        if inspection.layers.contains(where: { $0.state == .corrupt || $0.state == .missing }) { throw ExitCode(JobError.Kind.badInput.exitCode) }
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
    var dtype: AdapterDType = .f32

    @OptionGroup var logging: LogOptions

    func run() throws {
        let inspection = try CheckpointInspection(directory: directory)
        let count = try inspection.export(to: out, dtype: dtype.tensorDType)
        log("exported \(count) of \(inspection.layers.count) layers to \(out)")
    }
}
