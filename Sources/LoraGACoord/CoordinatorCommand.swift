import ArgumentParser
import Foundation
import Logging
import NIOConcurrencyHelpers
import LoRAGACore
import LoRAGACoordinator
import LoRAGADaemon
import LoRAGAFormats

@main
struct CoordinatorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-ga-coord",
        abstract: "Coordinator daemon: sums per-layer gradients streamed by lora-ga-worker processes and writes the LoRA-GA adapter.",
        discussion: """
            Waits for --workers workers, checks they announce the same layers, then processes the \
            layers in turn (at most --window open at once), checkpointing each finished layer under \
            OUT/checkpoints/. When every layer is done it writes OUT/adapter_model.safetensors, \
            OUT/adapter_config.json and OUT/lora_ga_report.json, tells the workers, and exits 0. \
            Restarted on the same OUT, it resumes. See Config/coordinator.json.

            \(SettingsCatalog.coordinator.helpText())

            \(ExitStatus.helpText)
            """)

    /// Every setting is declared in ``SettingsCatalog/coordinator``; it parses them.
    @Argument(parsing: .allUnrecognized, help: .hidden) var arguments: [String] = []

    func run() async throws {
        let metrics = CoordinatorMetrics()
        let status = await DaemonMain.run(schema: SettingsCatalog.coordinator, label: "lora-ga-coord", arguments: arguments,
                                          metrics: metrics.daemon) { resolved, logger in
            var settings = try CoordinatorSettings(resolved)
            settings.options.metrics = metrics
            if let note = BLAS.setUpForThisProcess() { logger.info("\(note)") }
            BLAS.configureThreads()
            // Dense receives at network speed, so freed frames are reused at once. Sketch folds
            // at GEMM speed while frames queue, and kept frames only add memory.
            if settings.options.settings.mode == .dense { StreamingMemory.keepFrameBuffersMapped() }
            let server = CoordinatorServer(host: settings.host, port: settings.port, options: settings.options, tls: settings.tls, logger: logger)
            let portFile = settings.portFile
            let engine = NIOLockedValueBox<CoordinatorEngine?>(nil)
            let summary = try await GracefulJob.run(logger: logger, {
                try await server.run { port, running in
                    engine.withLockedValue { $0 = running }
                    if let portFile { try? "\(port)\n".write(toFile: portFile, atomically: true, encoding: .utf8) }
                }
            }, onSignal: {
                await engine.withLockedValue { $0 }?.shutdown(reason: "a termination signal")
            })
            let megabytes = Double(summary.bytesReceived) / 1e6
            logger.info("""
                done: \(summary.layers) layers in \(String(format: "%.2f", summary.seconds)) s, \
                \(String(format: "%.1f", megabytes)) MB received (\(String(format: "%.0f", megabytes / max(summary.seconds, 1e-9))) MB/s), \
                \(summary.receivingSeconds.map { String(format: "receiving %.2f s (ingest %.0f MB/s), ", $0, megabytes / max($0, 1e-9)) } ?? "")\
                peak RSS \(ResourceUsage.peakResidentBytes / 1_000_000) MB, CPU \(String(format: "%.1f", ResourceUsage.cpuSeconds)) s\
                \(summary.worstFidelityEstimate.map { String(format: ", worst ratio≈%.4f", $0) } ?? ""); adapter in \(summary.adapterDirectory)
                """)
            if let summaryFile: String = try resolved.value("summary-file") {
                try ProcessSummary(role: "coordinator", bytes: summary.bytesReceived, seconds: summary.seconds).write(to: summaryFile)
            }
        }
        if status != 0 { throw ExitCode(status) }
    }
}
