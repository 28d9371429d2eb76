import ArgumentParser
import Foundation
import Logging
import NIOConcurrencyHelpers
import LoRAGACore
import LoRAGADaemon
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
            connection. See Config/worker.json.

            \(SettingsCatalog.worker.helpText())

            \(ExitStatus.helpText)
            """)

    /// Every setting is declared in ``SettingsCatalog/worker``; it parses them.
    @Argument(parsing: .allUnrecognized, help: .hidden) var arguments: [String] = []

    func run() async throws {
        let metrics = WorkerMetrics()
        let status = await DaemonMain.run(schema: SettingsCatalog.worker, label: "lora-ga-worker", arguments: arguments,
                                          metrics: metrics.daemon) { settings, logger in
            if let note = BLAS.setUpForThisProcess() { logger.info("\(note)") }
            let started = ContinuousClock.now
            StreamingMemory.keepFrameBuffersMapped()
            var options = try Self.options(settings)
            options.metrics = metrics
            logger[metadataKey: "worker"] = "\(options.id)"
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
            if let summaryFile: String = try settings.value("summary-file") {
                let elapsed = ContinuousClock.now - started
                try ProcessSummary(role: options.id, bytes: summary.bytesSent, seconds: elapsed.seconds,
                                   inputBytes: summary.inputBytes).write(to: summaryFile)
            }
        }
        if status != 0 { throw ExitCode(status) }
    }

    /// The worker's options from its resolved settings.
    static func options(_ settings: ResolvedSettings) throws -> WorkerOptions {
        let (host, port) = try LayeredSettings.hostAndPort(try settings.required("connect"), setting: "connect")
        let paths = settings.list("grads")
        guard !paths.isEmpty else { throw JobError(.usage, LayeredSettings.missing("grads")) }
        let id = try settings.value("id") ?? "\(ProcessInfo.processInfo.hostName)-\(ProcessInfo.processInfo.processIdentifier)"
        var options = WorkerOptions(host: host, port: port, id: id, gradientPaths: paths)
        let timeout: Double = try settings.required("connect-timeout")
        guard timeout >= 0 else { throw JobError(.usage, "--connect-timeout must not be negative") }
        options.connectTimeout = .seconds(timeout)
        if let rate: Double = try settings.value("rate-limit") {
            guard rate > 0 else { throw JobError(.usage, "--rate-limit must be a positive number of MB/s") }
            options.maxBytesPerSecond = rate * 1e6
        }
        if let path: String = try settings.value("secret-file") {
            do { options.secret = try JobSecret(file: path) } catch { throw JobError(.usage, "--secret-file \(path): \(error)") }
        }
        let certificate: String? = try settings.value("tls-cert"), key: String? = try settings.value("tls-key")
        if let ca: String = try settings.value("tls-ca") {
            options.tls = try DaemonTLS.clientContext(ca: ca, certificate: certificate, key: key)
            options.tlsServerName = try settings.value("tls-server-name")
        } else if certificate != nil || key != nil {
            throw JobError(.usage, "--tls-cert/--tls-key need --tls-ca (the CA that signed the coordinator's certificate)")
        }
        return options
    }
}
