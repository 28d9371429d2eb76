import Foundation
import Logging

/// What every daemon's main does around its job: resolve the declared settings, set up
/// logging (`--log-level`, `--log-format`), optionally serve metrics, run, write the metrics
/// file, and turn the outcome into the documented exit status.
public enum DaemonMain {
    /// Resolves `arguments` against `schema` and runs `body` with the settings and a logger.
    /// Returns the process's exit status (see ``ExitStatus``).
    public static func run(
        schema: SettingsSchema, label: String, arguments: [String],
        environment: [String: String] = ProcessInfo.processInfo.environment,
        metrics: DaemonMetrics? = nil,
        _ body: (ResolvedSettings, inout Logger) async throws -> Void
    ) async -> Int32 {
        let settings: ResolvedSettings
        let format: LogFormat
        let level: Logger.Level
        do {
            settings = try ResolvedSettings(schema: schema, arguments: arguments, environment: environment)
            let (formatText, formatSource) = settings.text("log-format")!
            format = try DaemonLogging.format(formatText, source: formatSource)
            let (levelText, levelSource) = settings.text("log-level")!
            level = try DaemonLogging.level(levelText, source: levelSource)
        } catch {
            DaemonLogging.bootstrap(format: .text)
            Logger(label: label).error("\(error)")
            return ExitStatus.code(of: error)
        }
        DaemonLogging.bootstrap(format: format)
        var logger = Logger(label: label)
        logger.logLevel = level
        var status: Int32 = 0
        var server: MetricsServer?
        do {
            if let metrics {
                metrics.bootstrapSwiftMetrics()
                if let address: String = try settings.value("metrics-listen") {
                    let (host, port) = try LayeredSettings.hostAndPort(address, setting: "--metrics-listen")
                    server = try await MetricsServer.start(host: host, port: port, metrics: metrics)
                    logger.info("metrics at http://\(host):\(server!.port)/metrics")
                }
            }
            try await body(settings, &logger)
        } catch {
            let kind = ExitStatus.kind(of: error)
            logger.error("\(error)", metadata: ["exit": "\(kind.exitCode)"])
            status = kind.exitCode
        }
        await server?.close()
        if let metrics, let path: String = try? settings.value("metrics-file") {
            do { try metrics.writeTextfile(to: path) } catch {
                logger.error("\(error)")
                if status == 0 { status = ExitStatus.code(of: error) }
            }
        }
        return status
    }
}
