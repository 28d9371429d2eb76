import Foundation
import LoRAGACore
import Metrics
import NIOConcurrencyHelpers
import Prometheus

/// A daemon's Prometheus metrics: its own registry (so several daemons in one test process
/// do not mix), the process's resident memory, the text exposition served at `/metrics`,
/// and the node-exporter textfile written at exit.
public final class DaemonMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let residentMemory: Prometheus.Gauge
    let peakResidentMemory: Prometheus.Gauge
    let cpuSeconds: Prometheus.Gauge

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        residentMemory = registry.makeGauge(name: "lora_ga_resident_memory_bytes", help: "Resident set size of this process.")
        peakResidentMemory = registry.makeGauge(name: "lora_ga_peak_resident_memory_bytes", help: "Peak resident set size of this process.")
        cpuSeconds = registry.makeGauge(name: "lora_ga_cpu_seconds", help: "User + system CPU seconds of this process.")
    }

    /// Routes swift-metrics (Counter, Gauge, Timer… of any library in the process) into this
    /// registry too. Once per process, by an executable's main.
    public func bootstrapSwiftMetrics() {
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
    }

    /// The Prometheus text exposition, with the process gauges read now.
    public func exposition() -> String {
        residentMemory.set(Double(Self.residentBytes))
        peakResidentMemory.set(Double(ResourceUsage.peakResidentBytes))
        cpuSeconds.set(ResourceUsage.cpuSeconds)
        return registry.emitToString()
    }

    /// Writes the exposition to `path` for node-exporter's textfile collector: into a
    /// temporary file in the same directory, then renamed, so a scrape never reads half a file.
    public func writeTextfile(to path: String) throws {
        let url = URL(fileURLWithPath: path)
        let temporary = url.deletingLastPathComponent().appendingPathComponent(".\(url.lastPathComponent).\(getpid()).tmp")
        do {
            try Data(exposition().utf8).write(to: temporary)
            if FileManager.default.fileExists(atPath: path) { try FileManager.default.removeItem(at: url) }
            try FileManager.default.moveItem(at: temporary, to: url)
        } catch {
            try? FileManager.default.removeItem(at: temporary)
            throw JobError(.other, "--metrics-file \(path): \(error.localizedDescription)")
        }
    }

    /// Current resident set size (the second field of /proc/self/statm, in pages); 0 where
    /// there is no /proc.
    public static var residentBytes: Int {
        guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}

/// The coordinator's metrics and its progress estimate. The engine reports events through
/// a handful of calls; every method is cheap and thread-safe.
public final class CoordinatorMetrics: Sendable {
    public let daemon: DaemonMetrics
    let layersTotal: Prometheus.Gauge
    let layersDone: Prometheus.Gauge
    let connectedWorkers: Prometheus.Gauge
    let receivedBytes: Prometheus.Counter
    let layerSeconds: DurationHistogram
    let progress = NIOLockedValueBox(JobProgress())

    public init(daemon: DaemonMetrics = DaemonMetrics()) {
        self.daemon = daemon
        let registry = daemon.registry
        layersTotal = registry.makeGauge(name: "lora_ga_layers_total", help: "Layers in the job.")
        layersDone = registry.makeGauge(name: "lora_ga_layers_done", help: "Layers finished and checkpointed (including those a restart resumed).")
        connectedWorkers = registry.makeGauge(name: "lora_ga_workers_connected", help: "Workers connected and announced.")
        receivedBytes = registry.makeCounter(name: "lora_ga_received_bytes_total", help: "Payload bytes received from workers (shards and power replies).")
        layerSeconds = registry.makeDurationHistogram(
            name: "lora_ga_layer_seconds",
            buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600].map { Duration.milliseconds(Int64($0 * 1000)) },
            help: "Seconds per layer, from its first request to its checkpoint.")
    }

    /// The job's layers are known; `done` of them were finished by an earlier run.
    public func jobStarted(layers: Int, done: Int) {
        layersTotal.set(Double(layers))
        layersDone.set(Double(done))
        progress.withLockedValue { $0 = JobProgress(total: layers, done: done) }
    }

    /// A layer was checkpointed after `seconds`; returns the progress text for its log line
    /// ("ETA 3m20s").
    @discardableResult
    public func layerDone(seconds: Double) -> String {
        layerSeconds.record(Duration.milliseconds(Int64((seconds * 1000).rounded())))
        let (done, text) = progress.withLockedValue { progress in
            progress.layerDone()
            return (progress.done, progress.estimate())
        }
        layersDone.set(Double(done))
        return text
    }

    public func received(bytes: Int) {
        receivedBytes.increment(by: Int64(bytes))
    }

    public func workersConnected(_ count: Int) {
        connectedWorkers.set(Double(count))
    }
}

/// A worker's metrics.
public final class WorkerMetrics: Sendable {
    public let daemon: DaemonMetrics
    let sentBytes: Prometheus.Counter
    let rows: Prometheus.Counter
    let reconnects: Prometheus.Counter
    let layers: Prometheus.Counter

    public init(daemon: DaemonMetrics = DaemonMetrics()) {
        self.daemon = daemon
        let registry = daemon.registry
        sentBytes = registry.makeCounter(name: "lora_ga_worker_sent_bytes_total", help: "Payload bytes sent to the coordinator (shards and power replies).")
        rows = registry.makeCounter(name: "lora_ga_worker_rows_total", help: "Gradient rows sent (dense, sketch) or multiplied for a power round (power).")
        reconnects = registry.makeCounter(name: "lora_ga_worker_reconnects_total", help: "Connections to the coordinator after the first.")
        layers = registry.makeCounter(name: "lora_ga_worker_layers_total", help: "Layers sent (dense, sketch) or power replies answered (power).")
    }

    public func sent(bytes: Int, rows count: Int) {
        sentBytes.increment(by: Int64(bytes))
        rows.increment(by: Int64(count))
        layers.increment()
    }

    public func reconnected() {
        reconnects.increment()
    }
}

/// Layers done over time, and the estimated time left: the mean time per layer finished in
/// this run times the layers left (layers are processed in turn, so this is linear enough).
public struct JobProgress: Sendable {
    public var total = 0
    public var done = 0
    let doneAtStart: Int
    let started: ContinuousClock.Instant

    public init(total: Int = 0, done: Int = 0, started: ContinuousClock.Instant = .now) {
        self.total = total
        self.done = done
        self.doneAtStart = done
        self.started = started
    }

    public mutating func layerDone() { done += 1 }

    public var fraction: Double { total > 0 ? Double(done) / Double(total) : 0 }

    /// "ETA 1m05s" (or "ETA –" before the first layer of this run is done).
    public func estimate(now: ContinuousClock.Instant = .now) -> String {
        let finishedHere = done - doneAtStart
        guard finishedHere > 0 else { return "ETA –" }
        let perLayer = (now - started).seconds / Double(finishedHere)
        return "ETA " + Self.format(seconds: perLayer * Double(max(0, total - done)))
    }

    public static func format(seconds: Double) -> String {
        let whole = Int(seconds.rounded())
        if whole < 60 { return "\(whole)s" }
        if whole < 3600 { return String(format: "%dm%02ds", whole / 60, whole % 60) }
        return String(format: "%dh%02dm", whole / 3600, (whole % 3600) / 60)
    }
}
