import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGADaemon

struct InitCommand: ParsableCommand, LoggingCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Compute LoRA-GA factors from gradient files in this process and write a PEFT adapter.",
        discussion: """
            Writes OUT/adapter_model.safetensors and OUT/adapter_config.json (PEFT LoRA), \
            OUT/lora_ga_report.json (per layer: shape, top singular values, mode, time, fidelity), \
            and OUT/checkpoints/ (one zstd-compressed checkpoint per finished layer). \
            Re-running with the same OUT resumes after the last finished layer.

            LoRA-GA factors are not zero: train with lora_ga.attach (Scripts/python), which \
            cancels scaling · lora_B @ lora_A without touching the base, or offset every frozen \
            weight by W ← W − scaling · lora_B @ lora_A (Scripts/apply_lora_ga.py). \
            --method lora-one needs no offset.
            """)

    @OptionGroup var lora: LoRAOptions

    @Option(name: .shortAndLong, help: "Output directory.")
    var out: String

    @Option(help: "Regular expression selecting layers by tensor name (default: every 2-D tensor).")
    var target: String?

    @Option(help: "dtype of the adapter tensors: f32, bf16 or f16.")
    var dtype: TensorDType = .f32

    @Flag(help: "Discard an existing job in OUT instead of resuming it.")
    var restart = false

    @Flag(help: "Power mode: read each layer once more to report a fidelity estimate (dense mode always does; `lora-ga verify` measures it exactly).")
    var estimateFidelity = false

    @Flag(help: "Count entries of a layer that no gradient file covers (blocks leaving a hole) as zeros instead of refusing the layer.")
    var allowUncovered = false

    @Argument(help: "Gradient files, or directories holding *.safetensors (searched recursively).")
    var paths: [String]

    @OptionGroup var logging: LogOptions

    func run() throws {
        let files = try GradientFileSet(paths: paths, target: target, uncovered: allowUncovered ? .zero : .refused)
        let settings = lora.settings(microBatches: try lora.resolvedMicroBatches(files: files.files))
        log("lora-ga init: \(files.files.count) gradient files, \(files.layers.count) layers, rank \(settings.lora.rank), mode \(settings.mode.rawValue) → \(out)")
        var job = try LocalJob(files: files, settings: settings, outputDirectory: out, restart: restart, progress: log)
        job.estimatesFidelity = estimateFidelity
        let bar = logging.logFormat == "text" ? ProgressBar.forTerminal(total: files.layers.count) : nil
        if let bar {
            CLILog.beforeWrite = { bar.clear() }
            job.layerDone = { done, total in bar.update(done: done, total: total) }
        }
        let clock = ContinuousClock.now
        let reports = try job.run(adapterDType: dtype)
        bar?.finish()
        CLILog.beforeWrite = {}
        let worst = reports.compactMap(\.fidelityEstimate).max()
        log("done: \(reports.count) layers in \(ContinuousClock.now - clock)"
            + (worst.map { String(format: ", worst ratio≈%.4f", $0) } ?? "")
            + "; adapter in \(out)/\(PEFTAdapter.weightsFileName)")
    }
}
