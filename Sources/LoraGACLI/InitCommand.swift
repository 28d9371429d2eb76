import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGADaemon

struct InitCommand: CatalogCommand {
    static let schema = SettingsCatalog.initCommand
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Compute LoRA-GA factors from gradient files in this process and write a PEFT adapter.",
        usage: usage,
        discussion: discussion("""
            Writes OUT/adapter_model.safetensors and OUT/adapter_config.json (PEFT LoRA), \
            OUT/lora_ga_report.json (per layer: shape, top singular values, mode, time, fidelity), \
            and OUT/checkpoints/ (one zstd-compressed checkpoint per finished layer). \
            Re-running with the same OUT resumes after the last finished layer.

            LoRA-GA factors are not zero: train with lora_ga.attach (Scripts/python), which \
            cancels scaling · lora_B @ lora_A without touching the base, or offset every frozen \
            weight by W ← W − scaling · lora_B @ lora_A (Scripts/apply_lora_ga.py). \
            --method lora-one needs no offset.

            Example: lora-ga init --rank 8 --out adapter/ grads/worker0 grads/worker1
            """))

    /// Every setting is declared in ``SettingsCatalog/initCommand``; it parses them.
    @Argument(parsing: .allUnrecognized, help: .hidden) var arguments: [String] = []

    func run(_ resolved: ResolvedSettings) throws {
        let out: String = try resolved.required("out")
        let files = try GradientFileSet(paths: try resolved.gradientPaths(), target: try resolved.value("target"),
                                        uncovered: try resolved.flag("allow-uncovered") ? .zero : .refused)
        let settings = try resolved.jobSettings(readingMicroBatchesFrom: { files.files })
        log("lora-ga init: \(files.files.count) gradient files, \(files.layers.count) layers, rank \(settings.lora.rank), mode \(settings.mode.rawValue) → \(out)")
        var job = try LocalJob(files: files, settings: settings, outputDirectory: out, restart: try resolved.flag("restart"), progress: log)
        job.estimatesFidelity = try resolved.flag("estimate-fidelity")
        let bar = resolved.logsAsText ? ProgressBar.forTerminal(total: files.layers.count) : nil
        if let bar {
            CLILog.beforeWrite = { bar.clear() }
            job.layerDone = { done, total in bar.update(done: done, total: total) }
        }
        let clock = ContinuousClock.now
        let reports = try job.run(adapterDType: try resolved.dtype("adapter-dtype"))
        bar?.finish()
        CLILog.beforeWrite = {}
        let worst = reports.compactMap(\.fidelityEstimate).max()
        log("done: \(reports.count) layers in \(ContinuousClock.now - clock)"
            + (worst.map { String(format: ", worst ratio≈%.4f", $0) } ?? "")
            + "; adapter in \(out)/\(PEFTAdapter.weightsFileName)")
    }
}
