import ArgumentParser
import Foundation
import Logging
import NIOConcurrencyHelpers
import LoRAGACore
import LoRAGACoordinator
import LoRAGAWorker
import LoRAGAFormats
import LoRAGAWire

@main
struct WorkerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-ga-worker",
        abstract: "Worker daemon: streams this node's per-layer gradients to lora-ga-coord.",
        discussion: """
            Reads the safetensors gradient files under --grads (same-named tensors are summed \
            locally), joins the coordinator's job and serves it layer by layer: row-block shards \
            in dense and sketch mode, products with its gradient in power mode. Retries while the \
            coordinator is unreachable (--connect-timeout) and reconnects after a dropped \
            connection; exits 0 when the adapter is written, 1 with the reason otherwise.

            Settings may also come from LORA_GA_<NAME> environment variables or a JSON --config file.
            """)

    @Option(help: "JSON config file (keys are the flag names).") var config: String?
    @Option(help: "Coordinator address HOST:PORT (default 127.0.0.1:7070).") var connect: String?
    @Option(help: "Gradient file or directory (repeatable; directories are searched for *.safetensors).") var grads: [String] = []
    @Option(help: "This worker's id, unique in the job (default: hostname-pid).") var id: String?
    @Option(help: "Seconds to keep trying to reach the coordinator (default 300).") var connectTimeout: Double?
    @Option(help: "Write a JSON summary (bytes sent, peak RSS, CPU) here at the end.") var summaryFile: String?
    @Option(help: "File holding the job's shared secret (also LORA_GA_SECRET_FILE).") var secretFile: String?
    @Option(help: "Cap shard traffic at this many MB/s (default: no cap).") var rateLimit: Double?

    func run() async throws {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "lora-ga-worker")
        logger.logLevel = .info
        if let note = BLAS.setUpForThisProcess() { logger.info("\(note)") }
        let started = ContinuousClock.now
        StreamingMemory.keepFrameBuffersMapped()
        do {
            let settings = try LayeredSettings(configFile: config)
            let address = settings.text("connect", flag: connect)?.value ?? "127.0.0.1:7070"
            let (host, port) = try LayeredSettings.hostAndPort(address, setting: "connect")
            var paths = grads
            if paths.isEmpty, let fromSettings = settings.text("grads", flag: nil)?.value {
                paths = fromSettings.split(separator: ",").map(String.init)
            }
            guard !paths.isEmpty else { throw JobError(LayeredSettings.missing("grads")) }
            let workerID = settings.text("id", flag: id)?.value ?? "\(ProcessInfo.processInfo.hostName)-\(ProcessInfo.processInfo.processIdentifier)"
            logger[metadataKey: "worker"] = "\(workerID)"
            var options = WorkerOptions(host: host, port: port, id: workerID, gradientPaths: paths)
            if let (text, source) = settings.text("connect-timeout", flag: connectTimeout.map { "\($0)" }) {
                guard let seconds = Double(text), seconds >= 0 else { throw JobError("\(source): '\(text)' is not a number of seconds") }
                options.connectTimeout = .seconds(seconds)
            }
            if let (text, source) = settings.text("rate-limit", flag: rateLimit.map { "\($0)" }) {
                guard let rate = Double(text), rate > 0 else { throw JobError("\(source): '\(text)' is not a positive number of MB/s") }
                options.maxBytesPerSecond = rate * 1e6
            }
            if let path = settings.text("secret-file", flag: secretFile)?.value {
                options.secret = try JobSecret(file: path)
            }
            let client = WorkerClient(options: options, logger: logger)
            let task = NIOLockedValueBox<Task<WorkerSummary, Error>?>(nil)
            let summary = try await GracefulJob.run(logger: logger, {
                let running = Task { try await client.run() }
                task.withLockedValue { $0 = running }
                return try await running.value
            }, onSignal: {
                // The coordinator sees the connection close and discards this worker's partial layer.
                task.withLockedValue { $0 }?.cancel()
            })
            logger.info("""
                done: \(summary.layersSent) layers sent, \(summary.powerReplies) power replies, \
                \(String(format: "%.1f", Double(summary.bytesSent) / 1e6)) MB sent over \(summary.connections) connection(s), \
                peak RSS \(ResourceUsage.peakResidentBytes / 1_000_000) MB, CPU \(String(format: "%.1f", ResourceUsage.cpuSeconds)) s
                """)
            if let summaryFile {
                let elapsed = ContinuousClock.now - started
                try ProcessSummary(role: workerID, bytes: summary.bytesSent, seconds: elapsed.seconds,
                                   inputBytes: summary.inputBytes).write(to: summaryFile)
            }
        } catch {
            logger.error("\(error)")
            throw ExitCode(1)
        }
    }
}
