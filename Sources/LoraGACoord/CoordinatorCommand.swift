import ArgumentParser
import Foundation
import Logging
import NIOConcurrencyHelpers
import LoRAGACore
import LoRAGACoordinator
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
            OUT/adapter_config.json and OUT/lora_ga_report.json, tells the workers, and exits 0; any \
            failure exits 1 with the reason. Restarted on the same OUT, it resumes.

            Every setting can also come from the environment (LORA_GA_<NAME>, e.g. LORA_GA_WORKERS=4) \
            or from a JSON --config file ({"workers": 4, "rank": 16, ...}); flags win over the \
            environment, which wins over the file. See Config/coordinator.json.
            """)

    @Option(help: "JSON config file (keys are the flag names).") var config: String?
    @Option(help: "Address to listen on, HOST:PORT (default 127.0.0.1:7070; port 0 picks a free one).") var listen: String?
    @Option(help: "Number of workers in the job (required).") var workers: Int?
    @Option(name: .shortAndLong, help: "Output directory (required).") var out: String?
    @Option(name: .shortAndLong, help: "LoRA rank r (default 8).") var rank: Int?
    @Option(help: "LoRA alpha (default 2r).") var alpha: Double?
    @Flag(help: "rsLoRA scaling alpha / √r.") var rslora = false
    @Option(help: "ArB2r (default) or A2rBr.") var direction: String?
    @Option(help: "stable (default), unit or gd.") var scale: String?
    @Option(help: "γ: of the stable scale for lora-ga (default 16), of LoRA-One's 1/√(σ₁γ) for lora-one (default 128).") var gamma: Double?
    @Option(help: "lora-ga (default; the base must be offset) or lora-one (top-r of the negative gradient, base used as is).") var method: String?
    @Option(help: "reference (default) or peft: PEFT's LoRA-GA scaling, B = U·diag(S/micro-batches)·c, A unscaled.") var convention: String?
    @Option(help: "Micro-batches summed into the gradients (all workers together); --convention peft divides by it (default 1).") var microBatches: Int?
    @Flag(help: "Gradients are stored [in, out] (GPT-2 Conv1D): factors of their transpose, adapter with fan_in_fan_out.") var fanInFanOut = false
    @Option(help: "power (default): workers keep their gradients and answer power-iteration rounds, sending (out+in)·k per round; dense: workers send each layer, summed here (memory out·in); sketch: shards folded into (out+in)·k sketches in one pass.") var mode: String?
    @Option(help: "Oversampling p (dense, power; default r + min(r, 16)).") var oversampling: Int?
    @Option(help: "Passes over G (dense, power; default \(SVDDefaults.passes)).") var passes: Int?
    @Option(help: "Sketch width k (sketch; default 4r + 128).") var sketchWidth: Int?
    @Option(help: "Seed of the test matrices.") var seed: UInt64?
    @Option(help: "Layers open at once (default 2).") var window: Int?
    @Option(help: "dtype shards travel in: f32 (default), bf16, f16.") var payloadDtype: String?
    @Flag(help: "zstd-compress byte-shuffled shards (helps on slow networks only).") var compress = false
    @Option(help: "dtype of the adapter tensors: f32 (default), bf16, f16.") var adapterDtype: String?
    @Option(help: "Seconds to wait for all workers to join (default 600).") var gatherTimeout: Double?
    @Option(help: "Seconds a worker that left may take to come back (default 120).") var rejoinTimeout: Double?
    @Flag(help: "Discard an existing job in OUT instead of resuming it.") var restart = false
    @Option(help: "Write the bound port to this file once listening.") var portFile: String?
    @Option(help: "Write a JSON summary (layers, bytes, peak RSS, CPU) here at the end.") var summaryFile: String?
    @Option(help: "File holding the job's shared secret (≥ 16 bytes; also LORA_GA_SECRET_FILE). Workers must prove they know it.") var secretFile: String?
    @Flag(help: "Allow listening on a non-loopback address without a secret (trusted networks only).") var insecure = false

    func run() async throws {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "lora-ga-coord")
        logger.logLevel = .info
        if let note = BLAS.setUpForThisProcess() { logger.info("\(note)") }
        var flags: [String: String] = [:]
        func put(_ key: String, _ value: (any CustomStringConvertible)?) { if let value { flags[key] = value.description } }
        put("listen", listen); put("workers", workers); put("out", out); put("rank", rank); put("alpha", alpha)
        put("direction", direction); put("scale", scale); put("gamma", gamma); put("mode", mode)
        put("method", method); put("convention", convention); put("micro-batches", microBatches)
        if fanInFanOut { flags["fan-in-fan-out"] = "true" }
        put("oversampling", oversampling); put("passes", passes); put("sketch-width", sketchWidth); put("seed", seed)
        put("window", window); put("payload-dtype", payloadDtype); put("adapter-dtype", adapterDtype)
        put("gather-timeout", gatherTimeout); put("rejoin-timeout", rejoinTimeout); put("port-file", portFile)
        put("secret-file", secretFile)
        if insecure { flags["insecure"] = "true" }
        if rslora { flags["rslora"] = "true" }
        if compress { flags["compress"] = "true" }
        if restart { flags["restart"] = "true" }
        do {
            let settings = try CoordinatorSettings(flags: flags, layers: LayeredSettings(configFile: config))
            BLAS.configureThreads()
            // Dense receives at network speed, so freed frames are reused at once. Sketch folds
            // at GEMM speed while frames queue, and kept frames only add memory (+30 MB, measured).
            if settings.options.settings.mode == .dense { StreamingMemory.keepFrameBuffersMapped() }
            let server = CoordinatorServer(host: settings.host, port: settings.port, options: settings.options, logger: logger)
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
            if let summaryFile {
                try ProcessSummary(role: "coordinator", bytes: summary.bytesReceived, seconds: summary.seconds).write(to: summaryFile)
            }
        } catch let error as JobError {
            logger.error("\(error)")
            throw ExitCode(error.kind.exitCode)
        } catch {
            logger.error("\(error)")
            throw ExitCode(1)
        }
    }
}
