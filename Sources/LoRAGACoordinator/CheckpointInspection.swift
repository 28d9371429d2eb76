import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGADaemon

/// `lora-ga inspect` and `lora-ga export`: what a job directory holds, and a PEFT adapter
/// from whatever layers in it are finished and intact (a partial job included).
public struct CheckpointInspection: Sendable {
    public enum State: String, Sendable, Codable {
        case ok, missing, corrupt, unfinished
    }

    public struct Layer: Sendable, Codable {
        public var index: Int
        public var name: String
        public var rows: Int
        public var cols: Int
        public var state: State
        public var detail: String?
        public var fileBytes: Int
        /// The factors as raw float32: 4 · r · (out + in).
        public var rawBytes: Int
        public var fidelityEstimate: Double?
        public var file: String?
    }

    public let directory: String
    public let manifest: JobManifest
    public let layers: [Layer]

    /// Accepts the job's output directory or its `checkpoints/` folder.
    public init(directory given: String) throws {
        let trimmed = given.hasSuffix("/") ? String(given.dropLast()) : given
        let directory = (trimmed as NSString).lastPathComponent == "checkpoints" ? (trimmed as NSString).deletingLastPathComponent : trimmed
        guard let manifest = CheckpointStore.existingManifest(in: directory) else {
            throw JobError(.badInput, "\(given): no readable checkpoints/\(CheckpointStore.manifestFileName) (is this a lora-ga output directory?)")
        }
        let checkpoints = (directory as NSString).appendingPathComponent("checkpoints")
        let rank = manifest.settings.lora.rank
        var layers: [Layer] = []
        for (index, layer) in manifest.layers.enumerated() {
            var entry = Layer(index: index, name: layer.name, rows: layer.rows, cols: layer.cols, state: .unfinished, detail: nil,
                              fileBytes: 0, rawBytes: 4 * rank * (layer.rows + layer.cols), fidelityEstimate: nil, file: nil)
            if let finished = manifest.finished[layer.name] {
                let path = (checkpoints as NSString).appendingPathComponent(finished.file)
                entry.file = path
                entry.fidelityEstimate = finished.report.fidelityEstimate
                entry.fileBytes = ((try? FileManager.default.attributesOfItem(atPath: path)[.size]) as? Int) ?? 0
                if !FileManager.default.fileExists(atPath: path) {
                    entry.state = .missing
                } else if let problem = CheckpointStore.problem(checkpointAt: path, for: layer, rank: rank, crc32c: finished.crc32c) {
                    entry.state = .corrupt
                    entry.detail = problem
                } else {
                    entry.state = .ok
                }
            }
            layers.append(entry)
        }
        self.directory = directory
        self.manifest = manifest
        self.layers = layers
    }

    public var intact: [Layer] { layers.filter { $0.state == .ok } }

    /// A human-readable table and totals.
    public func report() -> String {
        let settings = manifest.settings
        var lines = [
            "job: \(layers.count) layers, rank \(settings.lora.rank), alpha \(settings.lora.alpha), mode \(settings.mode.rawValue), direction \(settings.lora.direction.rawValue), scale \(settings.lora.scale), seed \(settings.seed)",
            "| # | layer | shape | state | checkpoint bytes | raw f32 bytes | compression | ratio≈ |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for layer in layers {
            let compression = layer.fileBytes > 0 ? String(format: "%.3f×", Double(layer.rawBytes) / Double(layer.fileBytes)) : "–"
            let ratio = layer.fidelityEstimate.map { String(format: "%.4f", $0) } ?? "–"
            let state = layer.state.rawValue + (layer.detail.map { " (\($0))" } ?? "")
            lines.append("| \(layer.index) | \(layer.name) | \(layer.rows)×\(layer.cols) | \(state) | \(layer.fileBytes) | \(layer.rawBytes) | \(compression) | \(ratio) |")
        }
        let finished = layers.filter { $0.fileBytes > 0 }
        let fileBytes = finished.reduce(0) { $0 + $1.fileBytes }
        let rawBytes = finished.reduce(0) { $0 + $1.rawBytes }
        let checkpoints = (directory as NSString).appendingPathComponent("checkpoints")
        let directoryBytes = ((try? FileManager.default.contentsOfDirectory(atPath: checkpoints)) ?? []).reduce(0) { total, name in
            total + (((try? FileManager.default.attributesOfItem(atPath: (checkpoints as NSString).appendingPathComponent(name))[.size]) as? Int) ?? 0)
        }
        lines.append(String(format: "%d/%d layers intact; checkpoints %d bytes vs %d bytes of raw float32 factors (%.3f×); the whole checkpoints/ directory with its manifest: %d bytes (%.3f×)",
                            intact.count, layers.count, fileBytes, rawBytes, fileBytes > 0 ? Double(rawBytes) / Double(fileBytes) : 0,
                            directoryBytes, directoryBytes > 0 ? Double(rawBytes) / Double(directoryBytes) : 0))
        return lines.joined(separator: "\n")
    }

    /// Writes a PEFT adapter with every intact layer; returns how many it holds.
    @discardableResult
    public func export(to output: String, dtype: TensorDType) throws -> Int {
        let usable = intact
        guard !usable.isEmpty else { throw JobError("\(directory): no finished, intact layer to export") }
        try PEFTAdapter.assemble(
            checkpoints: usable.map { (module: manifest.layers[$0.index].moduleName, path: $0.file!) },
            into: output, lora: manifest.settings.lora, dtype: dtype)
        return usable.count
    }
}
