import Foundation
import LoRAGACore

/// `planted-spectrum.json`, written by `lora-ga synth`: each layer's exact singular values.
public struct PlantedSpectrumFile: Codable, Sendable {
    public static let fileName = "planted-spectrum.json"
    public var layers: [String: [Double]]
    public init(layers: [String: [Double]]) { self.layers = layers }
}

/// Writes gradient files with planted spectra (`lora-ga synth`): worker w's file holds
/// G / W + E_w for every layer, the E_w cancelling in the sum, so only the sum of all
/// workers' files has the planted spectrum. Memory: U·S and V of one layer plus one block.
public struct SyntheticGradients {
    public struct LayerSpec: Sendable {
        public var name: String
        public var rows: Int
        public var cols: Int
        public init(name: String, rows: Int, cols: Int) {
            self.name = name
            self.rows = rows
            self.cols = cols
        }
    }

    public var layers: [LayerSpec]
    public var workers: Int
    public var plantedRank: Int
    public var decay: Double
    public var dtype: TensorDType
    public var seed: UInt64

    public init(layers: [LayerSpec], workers: Int, plantedRank: Int, decay: Double, dtype: TensorDType, seed: UInt64) {
        self.layers = layers
        self.workers = workers
        self.plantedRank = plantedRank
        self.decay = decay
        self.dtype = dtype
        self.seed = seed
    }

    /// Writes DIR/w{i}/grads.safetensors for each worker and DIR/planted-spectrum.json.
    public func write(to directory: String, progress: (String) -> Void = { _ in }) throws {
        let writers = try (0..<workers).map { worker -> SafeTensorsWriter in
            let workerDirectory = (directory as NSString).appendingPathComponent("w\(worker)")
            try FileManager.default.createDirectory(atPath: workerDirectory, withIntermediateDirectories: true)
            return try SafeTensorsWriter(
                path: (workerDirectory as NSString).appendingPathComponent("grads.safetensors"),
                tensors: layers.map { .init(name: $0.name, dtype: dtype, shape: [$0.rows, $0.cols]) },
                metadata: ["format": "pt", "generator": "lora-ga synth", "decay": "\(decay)", "planted_rank": "\(plantedRank)"])
        }
        var spectra: [String: [Double]] = [:]
        for (index, layer) in layers.enumerated() {
            // Per-layer seed so layers differ; the same (seed, layer index) always gives the same data.
            let planted = try PlantedGradient(rows: layer.rows, cols: layer.cols, plantedRank: plantedRank, decay: decay,
                                              workers: workers, seed: seed &+ UInt64(index) &* 1_000_003)
            spectra[layer.name] = planted.singularValues
            let blockRows = Swift.max(1, (8 << 20) / (4 * layer.cols))
            var start = 0
            while start < layer.rows {
                let range = start..<Swift.min(start + blockRows, layer.rows)
                for (worker, writer) in writers.enumerated() {
                    let block = planted.rows(range, worker: worker)
                    try block.storage.withUnsafeBufferPointer { try writer.write(layer.name, rows: range, values: $0) }
                }
                start = range.upperBound
            }
            progress("[\(index + 1)/\(layers.count)] \(layer.name) \(layer.rows)×\(layer.cols), planted rank \(planted.singularValues.count), decay \(decay)")
        }
        for writer in writers { try writer.finish() }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(PlantedSpectrumFile(layers: spectra))
            .write(to: URL(fileURLWithPath: (directory as NSString).appendingPathComponent(PlantedSpectrumFile.fileName)), options: .atomic)
    }
}
