import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGADaemon

/// `lora-ga init`: the whole job in one process, reading gradient files directly.
/// Layers go one at a time (memory is one layer's state), each checkpointed as it finishes.
public struct LocalJob {
    public let files: GradientFileSet
    public let settings: JobSettings
    public let store: CheckpointStore
    /// Called with one line per finished layer.
    public var progress: (String) -> Void
    /// Called with (layers done, layers in the job) after each layer, finished or skipped (for a progress bar).
    public var layerDone: (Int, Int) -> Void = { _, _ in }
    /// Power mode: spend one more read of each layer on the fidelity estimate (dense mode has
    /// the layer in memory and always estimates; `lora-ga verify` measures it exactly).
    public var estimatesFidelity = false
    /// Held for the job's life: no second process writes this output directory.
    private let lock: OutputLock

    public init(files: GradientFileSet, settings: JobSettings, outputDirectory: String, restart: Bool = false, progress: @escaping (String) -> Void = { _ in }) throws {
        let problems = settings.validationErrors()
        guard problems.isEmpty else { throw JobError(.usage, problems.joined(separator: "; ")) }
        self.files = files
        self.settings = settings
        self.lock = try OutputLock(directory: outputDirectory, purpose: "lora-ga init")
        self.store = try CheckpointStore(directory: outputDirectory, settings: settings, layers: files.layers, restart: restart)
        self.progress = progress
    }

    /// Runs every unfinished layer, then writes the adapter. Returns the per-layer reports.
    @discardableResult
    public func run(adapterDType: TensorDType = .f32) throws -> [LayerReport] {
        BLAS.configureThreads()
        let layers = files.layers
        for dropped in store.droppedLayers {
            progress("checkpoint of '\(dropped)' failed its checks; recomputing it")
        }
        var tracker = JobProgress(total: layers.count, done: layers.filter { store.isFinished($0) }.count)
        for (index, layer) in layers.enumerated() {
            if store.isFinished(layer) {
                progress("[\(index + 1)/\(layers.count)] \(layer.name): already finished, skipped")
                layerDone(tracker.done, layers.count)
                continue
            }
            let report = try solve(layer)
            tracker.layerDone()
            progress("[\(index + 1)/\(layers.count)] " + LocalJob.describe(report) + "; " + tracker.estimate())
            layerDone(tracker.done, layers.count)
        }
        try store.writeAdapter(dtype: adapterDType)
        return store.finishedReports
    }

    /// One layer: stream its summed row blocks through the mode's accumulator, factor, checkpoint.
    func solve(_ layer: GradientLayer) throws -> LayerReport {
        let clock = ContinuousClock.now
        var blocks = switch settings.mode {
        case .power: files.rowBlocks(of: layer, productWidth: settings.randomizedSVD.sketchWidth(rows: layer.rows, cols: layer.cols))
        case .sketch: files.rowBlocks(of: layer, productWidth: SingleViewSketch.blockProductWidth(width: settings.sketchWidth), minimumRows: SingleViewSketch.minimumBlockRows)
        case .dense: files.rowBlocks(of: layer)
        }
        let factors: LoRAFactors
        let svd: TruncatedSVD
        let fidelity: Double?
        switch settings.mode {
        case .dense, .sketch:
            var accumulator = try LayerAccumulator(name: layer.name, rows: layer.rows, cols: layer.cols, settings: settings)
            try blocks.forEachRowBlock { accumulator.add($0) }
            (factors, svd, fidelity) = try accumulator.finish(settings: settings)
        case .power:
            svd = try randomizedSVD(of: &blocks, parameters: settings.randomizedSVD, layerName: layer.name)
            factors = LoRAFactors(svd: svd, configuration: settings.lora)
            // One more read (two where the expanded residual would cancel).
            fidelity = estimatesFidelity ? try estimatedFidelity(of: &blocks, svd: svd, factors: factors) : nil
        }
        let elapsed = ContinuousClock.now - clock
        let report = LayerReport(
            name: layer.name, outFeatures: layer.rows, inFeatures: layer.cols, mode: settings.mode,
            singularValues: svd.s.map(Double.init), fidelityEstimate: fidelity,
            seconds: elapsed.seconds,
            bytesIn: blocks.bytesRead,
            gemmSeconds: settings.mode == .dense ? nil : blocks.blockWorkSeconds)
        try store.record(layer: layer, factors: factors, svd: svd, report: report)
        return report
    }

    public static func describe(_ report: LayerReport) -> String {
        let fidelity = report.fidelityEstimate.map { String(format: "ratio≈%.4f", $0) } ?? "ratio n/a (verify to measure)"
        let top = report.singularValues.first.map { String(format: "s1=%.4g", $0) } ?? ""
        let megabytes = Double(report.bytesIn) / 1e6
        let rate = report.seconds > 0 ? megabytes / report.seconds : 0
        let last = String(format: "s%d=%.4g", report.singularValues.count, report.singularValues.last ?? 0)
        return "\(report.name) \(report.outFeatures)×\(report.inFeatures) \(report.mode.rawValue): \(top) \(last) \(fidelity), "
            + String(format: "%.2f s, %.1f MB read (%.0f MB/s)", report.seconds, megabytes, rate)
    }
}
