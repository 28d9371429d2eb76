import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGAFormats

/// `lora-ga-bench shards …`: the planted-spectrum gradients of `lora-ga synth`, written as
/// row shards in the `lora_ga.blocks` convention, for Scripts/bench's scale-out and
/// model-scale runs. Each layer is generated once, a row block at a time, and every requested
/// layout gets the same values: OUT/rows1/w0 holds whole layers, OUT/rowsN/w{i} holds rows
/// [i·OUT/N, (i+1)·OUT/N) of every layer as a block. Memory: one layer's U·S and V plus one
/// row block, whatever the model's size.
struct ShardedGradients: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shards",
        abstract: "Write planted-spectrum gradients as row shards (lora_ga.blocks), streaming.",
        discussion: """
            Each layer's gradient is G = U·diag(s)·Vᵀ with s_i = i^(−decay), i = 1…planted-rank \
            (the generator of `lora-ga synth`). For every N in --row-shards it writes \
            OUT/rowsN/w0 … w{N−1}/grads.safetensors, shard i holding rows [i·OUT/N, (i+1)·OUT/N) \
            of every layer; N = 1 writes whole layers (no block metadata). OUT/rowsN/\
            planted-spectrum.json lets `lora-ga verify` use the exact optimum. --sample REGEX \
            also writes the whole gradient of the matching layers to OUT/sample (the same values), \
            to verify a sharded job's adapter against on a few layers. Prints a JSON summary.

            Examples:
              lora-ga-bench shards --out /tmp/so --layer 8192x28672 --row-shards 1 2 4
              lora-ga-bench shards --out /tmp/l7 --llama7b --dtype bf16 --row-shards 2 \\
                  --sample 'layers\\.(0|31)\\.'
            """)

    @Option(name: .shortAndLong, help: "Output directory.")
    var out: String

    @Option(parsing: .upToNextOption, help: "Layers as OUTxIN or NAME=OUTxIN.")
    var layer: [String] = []

    @Flag(help: "Llama-2-7B's linear layers: per block q, k, v, o 4096×4096, gate, up 11008×4096, down 4096×11008.")
    var llama7b = false

    @Option(help: "Transformer blocks with --llama7b.")
    var blocks = 32

    @Option(help: "Layers per block with --llama7b, in the order q k v o gate up down (7 = all).")
    var layersPerBlock = 7

    @Option(parsing: .upToNextOption, help: "Row-shard counts to write (1 = whole layers).")
    var rowShards: [Int] = [1]

    @Option(help: "dtype of the files: F32, BF16 or F16.")
    var dtype = "F32"

    @Option(help: "Planted rank ρ (capped by the shape).")
    var plantedRank = 512

    @Option(help: "Decay exponent of the planted spectrum (real gradients: about 0.8).")
    var decay = 0.8

    @Option(help: "Seed.")
    var seed: UInt64 = 1

    @Option(help: "Regular expression: also write the whole gradient of the matching layers to OUT/sample.")
    var sample: String?

    func validate() throws {
        guard llama7b != !layer.isEmpty else { throw ValidationError("give either --layer or --llama7b") }
        guard blocks >= 1, (1...7).contains(layersPerBlock) else { throw ValidationError("--blocks must be ≥ 1 and --layers-per-block 1…7") }
        guard !rowShards.isEmpty, rowShards.allSatisfy({ $0 >= 1 }) else { throw ValidationError("--row-shards must be positive") }
        guard let type = TensorDType(rawValue: dtype.uppercased()), type.isWritableFromFloat else {
            throw ValidationError("--dtype must be F32, BF16 or F16")
        }
        guard plantedRank >= 1 else { throw ValidationError("--planted-rank must be at least 1") }
        _ = try layers()
        if let sample { _ = try NSRegularExpression(pattern: sample) }
    }

    func layers() throws -> [SyntheticGradients.LayerSpec] {
        if llama7b {
            let kinds: [(String, Int, Int)] = [
                ("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 4096), ("self_attn.v_proj", 4096, 4096),
                ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 11008, 4096), ("mlp.up_proj", 11008, 4096),
                ("mlp.down_proj", 4096, 11008),
            ]
            return (0..<blocks).flatMap { block in
                kinds.prefix(layersPerBlock).map { .init(name: "model.layers.\(block).\($0.0).weight", rows: $0.1, cols: $0.2) }
            }
        }
        return try layer.enumerated().map { index, text in
            let parts = text.split(separator: "=", maxSplits: 1)
            let shapeText = parts.last.map(String.init) ?? ""
            let dims = shapeText.lowercased().split(separator: "x").compactMap { Int($0) }
            guard dims.count == 2, dims[0] > 0, dims[1] > 0 else {
                throw ValidationError("--layer '\(text)' is not OUTxIN or NAME=OUTxIN")
            }
            let name = parts.count == 2 ? String(parts[0]) : "synthetic.layer.\(index).\(dims[0])x\(dims[1]).weight"
            return .init(name: name, rows: dims[0], cols: dims[1])
        }
    }

    /// One output file: the rows of each layer it holds.
    private struct ShardFile {
        let directory: String
        let writer: SafeTensorsWriter
        let rows: (Int) -> Range<Int>   // layer rows → the rows this file holds of it
    }

    func run() throws {
        BLAS.configureThreads()
        let specs = try layers()
        let type = TensorDType(rawValue: dtype.uppercased())!
        let pattern = try sample.map { try NSRegularExpression(pattern: $0) }
        let sampled = specs.filter { spec in
            pattern.map { $0.firstMatch(in: spec.name, range: NSRange(spec.name.startIndex..., in: spec.name)) != nil } ?? false
        }
        let metadata = ["format": "pt", "generator": "lora-ga-bench shards", "decay": "\(decay)", "planted_rank": "\(plantedRank)"]

        func shardRows(_ rows: Int, _ shard: Int, of count: Int) -> Range<Int> { shard * rows / count..<(shard + 1) * rows / count }

        var files: [ShardFile] = []
        var layoutDirectories: [String] = []
        for count in Array(Set(rowShards)).sorted() {
            let layoutDirectory = (out as NSString).appendingPathComponent("rows\(count)")
            layoutDirectories.append(layoutDirectory)
            for shard in 0..<count {
                let directory = (layoutDirectory as NSString).appendingPathComponent("w\(shard)")
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                var fileMetadata = metadata
                if count > 1 {
                    fileMetadata[GradientBlocks.metadataKey] = GradientBlocks.metadataValue(Dictionary(uniqueKeysWithValues: specs.map {
                        ($0.name, GradientBlocks.Declaration(fullRows: $0.rows, fullCols: $0.cols,
                                                             rowOffset: shardRows($0.rows, shard, of: count).lowerBound, colOffset: 0))
                    }))
                }
                let writer = try SafeTensorsWriter(
                    path: (directory as NSString).appendingPathComponent("grads.safetensors"),
                    tensors: specs.map { .init(name: $0.name, dtype: type, shape: [shardRows($0.rows, shard, of: count).count, $0.cols]) },
                    metadata: fileMetadata)
                files.append(ShardFile(directory: directory, writer: writer, rows: { shardRows($0, shard, of: count) }))
            }
        }
        var sampleWriter: SafeTensorsWriter?
        let sampleDirectory = (out as NSString).appendingPathComponent("sample")
        if !sampled.isEmpty {
            try FileManager.default.createDirectory(atPath: sampleDirectory, withIntermediateDirectories: true)
            sampleWriter = try SafeTensorsWriter(path: (sampleDirectory as NSString).appendingPathComponent("grads.safetensors"),
                                                 tensors: sampled.map { .init(name: $0.name, dtype: type, shape: [$0.rows, $0.cols]) },
                                                 metadata: metadata)
        }
        let sampledNames = Set(sampled.map(\.name))

        var spectra: [String: [Double]] = [:]
        let started = Date()
        for (index, spec) in specs.enumerated() {
            // The same per-layer seed as `lora-ga synth`, so layer i matches its layer i.
            let planted = try PlantedGradient(rows: spec.rows, cols: spec.cols, plantedRank: plantedRank, decay: decay,
                                              seed: seed &+ UInt64(index) &* 1_000_003)
            spectra[spec.name] = planted.singularValues
            // Row blocks of ~8 MB of floats, cut at every shard boundary so each lands in one file per layout.
            var cuts = Set(stride(from: 0, to: spec.rows, by: Swift.max(1, (8 << 20) / (4 * spec.cols))))
            for file in files { cuts.insert(file.rows(spec.rows).lowerBound) }
            cuts.insert(spec.rows)
            let bounds = cuts.filter { $0 <= spec.rows }.sorted()
            for (start, end) in zip(bounds, bounds.dropFirst()) where start < end {
                let block = planted.rows(start..<end)
                try block.storage.withUnsafeBufferPointer { values in
                    for file in files {
                        let held = file.rows(spec.rows)
                        guard held.contains(start) else { continue }
                        try file.writer.write(spec.name, rows: (start - held.lowerBound)..<(end - held.lowerBound), values: values)
                    }
                    if sampledNames.contains(spec.name) { try sampleWriter?.write(spec.name, rows: start..<end, values: values) }
                }
            }
            log(String(format: "[%d/%d] %@ %d×%d, %.0f s", index + 1, specs.count, spec.name as NSString, spec.rows, spec.cols,
                       Date().timeIntervalSince(started)))
        }
        for file in files { try file.writer.finish() }
        try sampleWriter?.finish()

        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        for directory in layoutDirectories {
            try encoder.encode(PlantedSpectrumFile(layers: spectra))
                .write(to: URL(fileURLWithPath: (directory as NSString).appendingPathComponent(PlantedSpectrumFile.fileName)), options: .atomic)
        }
        if !sampled.isEmpty {
            try encoder.encode(PlantedSpectrumFile(layers: spectra.filter { sampledNames.contains($0.key) }))
                .write(to: URL(fileURLWithPath: (sampleDirectory as NSString).appendingPathComponent(PlantedSpectrumFile.fileName)), options: .atomic)
        }
        let summary = ShardedGradientsSummary(
            layers: specs.count, parameters: specs.reduce(0) { $0 + $1.rows * $1.cols }, dtype: type,
            bytesPerElement: type.byteSize, layouts: layoutDirectories, sample: sampled.isEmpty ? nil : sampleDirectory,
            sampledLayers: sampled.map(\.name), seconds: Date().timeIntervalSince(started))
        print(String(decoding: try encoder.encode(summary), as: UTF8.self))
    }
}

struct ShardedGradientsSummary: Encodable {
    var layers: Int
    var parameters: Int
    var dtype: TensorDType
    var bytesPerElement: Int
    var layouts: [String]
    var sample: String?
    var sampledLayers: [String]
    var seconds: Double
}
