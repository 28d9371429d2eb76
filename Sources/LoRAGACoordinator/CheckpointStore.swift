import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGADaemon

/// The job's durable record: what was asked (settings, layers) and what is finished
/// (each layer's checkpoint file and its CRC-32C). Rewritten atomically after every layer.
public struct JobManifest: Codable, Equatable, Sendable {
    public struct FinishedLayer: Codable, Equatable, Sendable {
        public var file: String
        /// CRC-32C of the checkpoint's content (every byte before its own trailing CRC).
        public var crc32c: UInt32
        public var report: LayerReport
    }

    public static let formatVersion = 1
    public var formatVersion: Int
    public var settings: JobSettings
    public var layers: [GradientLayer]
    public var finished: [String: FinishedLayer]

    public init(settings: JobSettings, layers: [GradientLayer]) {
        self.formatVersion = JobManifest.formatVersion
        self.settings = settings
        self.layers = layers
        self.finished = [:]
    }
}

/// A job's output directory:
///
///     OUT/checkpoints/manifest.json         job spec + finished layers
///     OUT/checkpoints/NNNN.ckpt             one zstd-compressed A0/B0 container per layer
///     OUT/adapter_model.safetensors         PEFT adapter, assembled from the checkpoints
///     OUT/adapter_config.json
///     OUT/lora_ga_report.json               per-layer report
///
/// Every file is written to a temporary name, fsync'd and renamed, so a crash leaves either
/// the old or the new version, never half of one.
public final class CheckpointStore {
    public let directory: String
    public private(set) var manifest: JobManifest
    public let checkpointDirectory: String

    public static let manifestFileName = "manifest.json"
    public static let reportFileName = "lora_ga_report.json"

    /// Opens (or starts) the job in `directory`: an existing manifest is reused if it describes
    /// the same job (its layers resume); a different job is refused unless `restart` is set.
    public init(directory: String, settings: JobSettings, layers: [GradientLayer], restart: Bool = false) throws {
        self.directory = directory
        self.checkpointDirectory = (directory as NSString).appendingPathComponent("checkpoints")
        try FileManager.default.createDirectory(atPath: checkpointDirectory, withIntermediateDirectories: true)
        let manifestPath = (checkpointDirectory as NSString).appendingPathComponent(CheckpointStore.manifestFileName)
        let fresh = JobManifest(settings: settings, layers: layers)
        if !restart, let data = FileManager.default.contents(atPath: manifestPath) {
            let existing: JobManifest
            do {
                existing = try JSONDecoder().decode(JobManifest.self, from: data)
            } catch {
                throw JobError(.badInput, "\(manifestPath): unreadable manifest (\(error)); pass --restart to start the job over")
            }
            if let difference = CheckpointStore.difference(existing, fresh) {
                throw JobError(.usage, "\(directory) holds a different job (\(difference)); use another --out, or pass --restart to discard it")
            }
            manifest = existing
            dropCorruptCheckpoints()
        } else {
            manifest = fresh
            try saveManifest()
        }
    }

    /// The manifest of a job already in `directory`, if any (and readable).
    public static func existingManifest(in directory: String) -> JobManifest? {
        let path = ((directory as NSString).appendingPathComponent("checkpoints") as NSString).appendingPathComponent(manifestFileName)
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return try? JSONDecoder().decode(JobManifest.self, from: data)
    }

    static func difference(_ old: JobManifest, _ new: JobManifest) -> String? {
        if old.formatVersion != new.formatVersion { return "manifest version \(old.formatVersion), this build writes \(new.formatVersion)" }
        if old.settings != new.settings { return "settings differ: it has \(old.settings.lora.method.rawValue) rank \(old.settings.lora.rank), mode \(old.settings.mode.rawValue), seed \(old.settings.seed); asked \(new.settings.lora.method.rawValue) rank \(new.settings.lora.rank), mode \(new.settings.mode.rawValue), seed \(new.settings.seed)" }
        if old.layers != new.layers { return "layer set differs: it has \(old.layers.count) layers, asked \(new.layers.count)" }
        return nil
    }

    /// A finished layer whose checkpoint is missing, fails its checks, or belongs to another
    /// layer is recomputed, never used.
    private func dropCorruptCheckpoints() {
        for layer in manifest.layers {
            guard let entry = manifest.finished[layer.name] else { continue }
            let path = (checkpointDirectory as NSString).appendingPathComponent(entry.file)
            if CheckpointStore.problem(checkpointAt: path, for: layer, rank: manifest.settings.lora.rank, crc32c: entry.crc32c) != nil {
                manifest.finished[layer.name] = nil
                droppedLayers.append(layer.name)
            }
        }
        manifest.finished = manifest.finished.filter { name, _ in manifest.layers.contains { $0.name == name } }
    }

    /// Why the checkpoint at `path` cannot stand for `layer`, or nil when it can: it must be
    /// readable and intact, hold exactly the content the manifest recorded (`crc32c`), and
    /// name this layer with this shape and rank (a checkpoint copied or renamed from another
    /// layer passes its own CRC, so its identity is checked too).
    public static func problem(checkpointAt path: String, for layer: GradientLayer, rank: Int, crc32c: UInt32) -> String? {
        guard FileManager.default.fileExists(atPath: path) else { return "missing" }
        let checkpoint: CheckpointFile
        do {
            checkpoint = try CheckpointFile.read(from: path)
        } catch {
            return "\(error)"
        }
        let content = contentChecksum(of: path)
        if content != crc32c {
            return String(format: "content CRC-32C %08x differs from the manifest's %08x", content, crc32c)
        }
        if checkpoint.layer != layer.moduleName {
            return "it holds layer '\(checkpoint.layer)', not '\(layer.moduleName)'"
        }
        if checkpoint.outFeatures != layer.rows || checkpoint.inFeatures != layer.cols || checkpoint.rank != rank {
            return "shape \(checkpoint.outFeatures)×\(checkpoint.inFeatures) r=\(checkpoint.rank), the manifest has \(layer.rows)×\(layer.cols) r=\(rank)"
        }
        return nil
    }

    /// Layers whose checkpoints were found corrupt on open (they will be recomputed).
    public private(set) var droppedLayers: [String] = []

    public func isFinished(_ layer: GradientLayer) -> Bool { manifest.finished[layer.name] != nil }

    public var finishedReports: [LayerReport] {
        manifest.layers.compactMap { manifest.finished[$0.name]?.report }
    }

    /// Durably records a finished layer: checkpoint first, then the manifest that points to it.
    public func record(layer: GradientLayer, factors: LoRAFactors, svd: TruncatedSVD, report: LayerReport) throws {
        guard let index = manifest.layers.firstIndex(of: layer) else {
            throw JobError("layer '\(layer.name)' is not part of this job")
        }
        let file = String(format: "%04d.ckpt", index)
        let path = (checkpointDirectory as NSString).appendingPathComponent(file)
        let lora = manifest.settings.lora
        let checkpoint = CheckpointFile(
            layer: layer.moduleName, outFeatures: layer.rows, inFeatures: layer.cols, rank: lora.rank,
            direction: lora.direction.rawValue, scale: lora.scale.description, seed: manifest.settings.seed,
            mode: report.mode, singularValues: report.singularValues, fidelity: report.fidelityEstimate,
            loraA: factors.a.storage, loraB: factors.b.storage)
        try checkpoint.write(to: path)
        manifest.finished[layer.name] = .init(file: file, crc32c: CheckpointStore.contentChecksum(of: path), report: report)
        try saveManifest()
    }

    /// Writes the PEFT adapter and the report from the finished checkpoints.
    public func writeAdapter(dtype: TensorDType, baseModel: String? = nil, extraReport: [String: String] = [:]) throws {
        let missing = manifest.layers.filter { !isFinished($0) }
        guard missing.isEmpty else {
            throw JobError("cannot write the adapter: \(missing.count) layers are unfinished (first: \(missing[0].name))")
        }
        let checkpoints = manifest.layers.map { layer in
            (module: layer.moduleName, path: (checkpointDirectory as NSString).appendingPathComponent(manifest.finished[layer.name]!.file))
        }
        try PEFTAdapter.assemble(checkpoints: checkpoints, into: directory, lora: manifest.settings.lora, dtype: dtype, baseModel: baseModel)
        try writeReport(extra: extraReport)
    }

    public func writeReport(extra: [String: String] = [:]) throws {
        struct Report: Encodable {
            var settings: JobSettings
            var method: String
            var scaling: Double
            var weightOffset: String
            var layers: [LayerReport]
            var worstFidelityEstimate: Double?
            var extra: [String: String]
        }
        let reports = finishedReports
        let report = Report(
            settings: manifest.settings, method: manifest.settings.lora.method.rawValue, scaling: manifest.settings.lora.scaling,
            weightOffset: manifest.settings.lora.method.needsBaseOffset
                ? "the training job must set W ← W − scaling · lora_B @ lora_A for every layer before step 0 (lora_ga.attach does it without touching the base)"
                : "none: \(manifest.settings.lora.method.rawValue) trains from the unmodified base",
            layers: reports, worstFidelityEstimate: reports.compactMap(\.fidelityEstimate).max(), extra: extra)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        try DurableFile.write(try encoder.encode(report), to: (directory as NSString).appendingPathComponent(CheckpointStore.reportFileName))
    }

    private func saveManifest() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try DurableFile.write(try encoder.encode(manifest), to: (checkpointDirectory as NSString).appendingPathComponent(CheckpointStore.manifestFileName))
    }

    /// CRC-32C of a checkpoint's content: every byte but the trailing CRC. (Over the whole
    /// file, trailer included, CRC-32C gives the same constant for every intact file.)
    public static func contentChecksum(of path: String) -> UInt32 {
        guard let data = FileManager.default.contents(atPath: path), data.count >= 4 else { return 0 }
        return data.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[..<(data.count - 4)])) }
    }
}
