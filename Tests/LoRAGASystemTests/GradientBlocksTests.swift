import Foundation
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator

/// Gradient files holding blocks of layers ("lora_ga.blocks"): validation, coverage, and
/// `lora-ga init` / `verify` in every mode giving what the unsharded sum gives.
@Suite struct GradientBlocksTests {
    /// One piece of a layer: rows × cols at an offset, `whole` when written without metadata.
    struct Piece {
        var rows: Range<Int>
        var cols: Range<Int>
        var whole = false
    }

    /// A 200×150 gradient of decaying spectrum (rank-24 signal plus noise), fixed seed.
    static func gradient(rows: Int = 200, cols: Int = 150, seed: UInt64 = 3) -> Matrix {
        let generator = TestMatrixGenerator(seed: seed, layerName: "blocks")
        let u = generator.matrix(rowCount: rows, width: 24, kind: .range)
        var v = generator.matrix(rowCount: cols, width: 24, kind: .coRange)
        for i in 0..<cols { for j in 0..<24 { v[i, j] *= Float(pow(0.8, Double(j))) } }
        var g = Matrix.product(u, v, transposeB: true)
        let noise = generator.matrix(rowCount: rows, width: cols, kind: .coreLeft)
        for index in g.storage.indices { g.storage[index] += 0.01 * noise.storage[index] }
        return g
    }

    /// Writes `pieces` of `g` (layer `name`) one file each, spread round-robin over `directories`;
    /// an entry covered by n pieces gets g/n in each, so the pieces add up to g.
    static func writePieces(_ pieces: [Piece], of g: Matrix, name: String, into directories: [String], tag: String = "") throws {
        var count = [Int](repeating: 0, count: g.rows * g.cols)
        for piece in pieces { for i in piece.rows { for j in piece.cols { count[i * g.cols + j] += 1 } } }
        for (index, piece) in pieces.enumerated() {
            var values: [Float] = []
            for i in piece.rows { for j in piece.cols { values.append(g[i, j] / Float(count[i * g.cols + j])) } }
            let metadata = piece.whole ? [:] : [GradientBlocks.metadataKey: GradientBlocks.metadataValue([
                name: .init(fullRows: g.rows, fullCols: g.cols, rowOffset: piece.rows.lowerBound, colOffset: piece.cols.lowerBound)])]
            let directory = directories[index % directories.count]
            try SafeTensorsWriter.write(path: "\(directory)/\(tag)\(name)-\(index).safetensors",
                                        tensors: [(.init(name: name, dtype: .f32, shape: [piece.rows.count, piece.cols.count]), values)], metadata: metadata)
        }
    }

    static func directories(_ count: Int, _ label: String = #function) throws -> [String] {
        try (0..<count).map { try Fixtures.scratch("\(label)-\($0)") }
    }

    /// Every value the set streams for its only layer, row by row.
    static func streamed(_ set: GradientFileSet) throws -> [Float] {
        var blocks = set.rowBlocks(of: set.layers[0], blockRows: 64)
        var seen: [Float] = []
        try blocks.forEachRowBlock { seen.append(contentsOf: $0.values) }
        return seen
    }

    static let schemes: [(String, [Piece])] = [
        ("row blocks", [Piece(rows: 0..<70, cols: 0..<150), Piece(rows: 70..<133, cols: 0..<150), Piece(rows: 133..<200, cols: 0..<150)]),
        ("column blocks", [Piece(rows: 0..<200, cols: 0..<50), Piece(rows: 0..<200, cols: 50..<101), Piece(rows: 0..<200, cols: 101..<150)]),
        ("overlapping blocks", [Piece(rows: 0..<120, cols: 0..<150), Piece(rows: 90..<200, cols: 0..<150), Piece(rows: 30..<170, cols: 40..<110)]),
        ("2-D blocks", [Piece(rows: 0..<100, cols: 0..<75), Piece(rows: 0..<100, cols: 75..<150), Piece(rows: 100..<200, cols: 0..<75), Piece(rows: 100..<200, cols: 75..<150)]),
        ("whole layer plus blocks", [Piece(rows: 0..<200, cols: 0..<150, whole: true), Piece(rows: 10..<60, cols: 20..<150), Piece(rows: 150..<200, cols: 0..<30)]),
    ]

    @Test(arguments: schemes.indices)
    func blocksStreamTheSummedLayer(scheme: Int) throws {
        let g = Self.gradient()
        let dirs = try Self.directories(3, "stream\(scheme)")
        try Self.writePieces(Self.schemes[scheme].1, of: g, name: "x.weight", into: dirs)
        let set = try GradientFileSet(paths: dirs)
        #expect(set.layers == [GradientLayer(name: "x.weight", rows: 200, cols: 150, dtype: .f32)])
        #expect(set.coverage(of: set.layers[0]).isComplete)
        let values = try Self.streamed(set)
        let worst = zip(values, g.storage).map { abs($0 - $1) }.max() ?? .infinity
        #expect(values.count == g.storage.count && worst < 1e-5, "\(Self.schemes[scheme].0): max difference \(worst)")
    }

    /// `lora-ga init` on each partition in each mode, checked by `lora-ga verify` against the
    /// unsharded gradient: dense and power reach the optimum (≤ 1.01), sketch its bound (≤ 1.05).
    @Test(arguments: [SVDMode.dense, .power, .sketch])
    func initOnBlocksMatchesTheUnshardedSum(mode: SVDMode) throws {
        let g = Self.gradient()
        let whole = try Fixtures.scratch("whole-\(mode)")
        try SafeTensorsWriter.write(path: whole + "/g.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [200, 150]), g.storage)])
        let settings = JobSettings(lora: LoRAConfiguration(rank: 4, alpha: 8), mode: mode)
        for (label, pieces) in Self.schemes {
            let dirs = try Self.directories(3, "init-\(mode)")
            try Self.writePieces(pieces, of: g, name: "x.weight", into: dirs)
            let out = try Fixtures.scratch("out-\(mode)")
            _ = try LocalJob(files: GradientFileSet(paths: dirs), settings: settings, outputDirectory: out).run()
            let results = try AdapterVerifier(files: GradientFileSet(paths: [whole]), adapterDirectory: out, plantedSpectrumPaths: []).verify()
            #expect(results.count == 1)
            #expect(results[0].ratio <= (mode == .sketch ? 1.05 : 1.01), "\(label), \(mode): ratio \(results[0].ratio)")
            // verify on the block set itself measures the same thing.
            let onBlocks = try AdapterVerifier(files: GradientFileSet(paths: dirs), adapterDirectory: out, plantedSpectrumPaths: []).verify()
            #expect(abs(onBlocks[0].ratio - results[0].ratio) < 1e-3, "\(label): \(onBlocks[0].ratio) vs \(results[0].ratio)")
        }
    }

    // MARK: - Validation

    func writeBlock(_ path: String, name: String = "x.weight", shape: [Int], metadata: String?) throws {
        try SafeTensorsWriter.write(path: path, tensors: [(.init(name: name, dtype: .f32, shape: shape), [Float](repeating: 1, count: shape.reduce(1, *)))],
                                    metadata: metadata.map { [GradientBlocks.metadataKey: $0] } ?? [:])
    }

    func refusal(_ paths: [String]) -> String {
        let error = #expect(throws: GradientSetError.self) { _ = try GradientFileSet(paths: paths) }
        return error?.description ?? ""
    }

    @Test func malformedEntriesAreRefusedNamingFileAndTensor() throws {
        let dir = try Fixtures.scratch()
        let cases: [(String, String)] = [
            ("not json", "not valid JSON"),
            ("[1, 2]", "not a JSON object"),
            (#"{"x.weight": 3}"#, "entry 'x.weight' is not an object"),
            (#"{"x.weight": {"shape": [10], "offset": [0, 0]}}"#, "entry 'x.weight' needs \"shape\""),
            (#"{"x.weight": {"shape": [10, 4], "offset": [0.5, 0]}}"#, "entry 'x.weight' needs \"offset\""),
            (#"{"x.weight": {"shape": [10, 4], "offset": [-1, 0]}}"#, "entry 'x.weight' needs \"offset\""),
            (#"{"x.weight": {"shape": [10, 4], "offset": [0, 0], "stride": 2}}"#, "unknown key \"stride\""),
            (#"{"y.weight": {"shape": [10, 4], "offset": [0, 0]}}"#, "entry 'y.weight' names a tensor the file does not hold"),
            (#"{"x.weight": {"shape": [10, 4], "offset": [5, 0]}}"#, "outside the full shape [10, 4]"),
            (#"{"x.weight": {"shape": [10, 4], "offset": [0, 1]}}"#, "reaches [6, 5]"),
        ]
        for (index, (metadata, expected)) in cases.enumerated() {
            let path = "\(dir)/case\(index).safetensors"
            try writeBlock(path, shape: [6, 4], metadata: metadata)
            let message = refusal([path])
            #expect(message.contains(path) && message.contains(expected), "\(metadata): \(message)")
        }
    }

    @Test func fullShapesThatDisagreeNameBothFiles() throws {
        let dir = try Fixtures.scratch()
        try writeBlock(dir + "/a.safetensors", shape: [6, 4], metadata: #"{"x.weight": {"shape": [12, 4], "offset": [0, 0]}}"#)
        try writeBlock(dir + "/b.safetensors", shape: [6, 4], metadata: #"{"x.weight": {"shape": [10, 4], "offset": [4, 0]}}"#)
        let message = refusal([dir])
        #expect(message.contains(dir + "/a.safetensors") && message.contains(dir + "/b.safetensors"), "\(message)")
        #expect(message.contains("[12, 4]") && message.contains("[10, 4]") && message.contains("x.weight"), "\(message)")
        // A whole layer disagreeing with a block's full shape, too.
        try writeBlock(dir + "/b.safetensors", shape: [10, 4], metadata: nil)
        let whole = refusal([dir])
        #expect(whole.contains(dir + "/a.safetensors") && whole.contains(dir + "/b.safetensors (whole layer)"), "\(whole)")
    }

    @Test func uncoveredLayerFailsNamingItAndPassesWithTheFlag() throws {
        let dir = try Fixtures.scratch()
        // Rows 0..<6 whole, rows 6..<10 only columns 0..<2: the rest is missing.
        try writeBlock(dir + "/a.safetensors", shape: [6, 4], metadata: #"{"x.weight": {"shape": [10, 4], "offset": [0, 0]}}"#)
        try writeBlock(dir + "/b.safetensors", shape: [4, 2], metadata: #"{"x.weight": {"shape": [10, 4], "offset": [6, 0]}}"#)
        let message = refusal([dir])
        #expect(message.contains("layer 'x.weight'") && message.contains("rows 6..<10, cols 2..<4") && message.contains("--allow-uncovered"), "\(message)")
        let accepted = try GradientFileSet(paths: [dir], uncovered: .zero)
        #expect(accepted.uncoveredLayers.map(\.name) == ["x.weight"])
        var blocks = accepted.rowBlocks(of: accepted.layers[0])
        var values: [Float] = []
        try blocks.forEachRowBlock { values.append(contentsOf: $0.values) }
        #expect(values == [Float](repeating: 1, count: 24) + [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0])
        #expect(accepted.report().contains("UNCOVERED: rows 6..<10, cols 2..<4"))
    }

    @Test func nonFiniteValueInABlockNamesFileAndLayerRow() throws {
        let dir = try Fixtures.scratch()
        var values = [Float](repeating: 1, count: 5 * 3)
        values[2 * 3 + 1] = .nan
        try writeBlock(dir + "/a.safetensors", shape: [10, 4], metadata: nil)
        try SafeTensorsWriter.write(path: dir + "/b.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [5, 3]), values)],
                                    metadata: [GradientBlocks.metadataKey: #"{"x.weight": {"shape": [10, 4], "offset": [4, 1]}}"#])
        let set = try GradientFileSet(paths: [dir])
        let error = #expect(throws: GradientError.self) { _ = try Self.streamed(set) }
        #expect(error == .nonFinite(layer: "x.weight", source: dir + "/b.safetensors", row: 6))
    }

    @Test func wholeLayerSetsKeepTheirStrictCheck() throws {
        // Without any blocks declared, a file missing a layer is still an error.
        let dir = try Fixtures.scratch()
        try SafeTensorsWriter.write(path: dir + "/a.safetensors", tensors: [
            (.init(name: "x.weight", dtype: .f32, shape: [4, 4]), [Float](repeating: 1, count: 16)),
            (.init(name: "y.weight", dtype: .f32, shape: [4, 4]), [Float](repeating: 1, count: 16)),
        ])
        try writeBlock(dir + "/b.safetensors", shape: [4, 4], metadata: nil)
        let message = refusal([dir])
        #expect(message.contains("y.weight") && message.contains("missing from \(dir)/b.safetensors"), "\(message)")
        // A sharded recording says so with the key, even empty: then a file may lack a layer
        // another file covers, and coverage is the check.
        try writeBlock(dir + "/b.safetensors", shape: [4, 4], metadata: "{}")
        let set = try GradientFileSet(paths: [dir])
        #expect(set.hasBlocks && set.layers.map(\.name) == ["x.weight", "y.weight"])
        #expect(set.contributions(of: set.layers[1]).count == 1)
    }

    // MARK: - Real gradients

    /// MiniLM's two workers' gradients summed, then cut into row blocks, column blocks,
    /// overlapping blocks, 2-D blocks and whole layers spread over 3 directories: `init` on
    /// the pieces gives adapters as good as on the original files (verified against them).
    @Test(arguments: [SVDMode.dense, .power])
    func realGradientsCutIntoBlocksGiveTheWholeFileResult(mode: SVDMode) throws {
        let originals = try Fixtures.minilmWorkers.flatMap { try GradientFileSet.expand([$0]) }.map { try SafeTensorsFile(path: $0) }
        let reference = try GradientFileSet(paths: Fixtures.minilmWorkers)
        let dirs = try Self.directories(3, "minilm-\(mode)")
        for (index, layer) in reference.layers.enumerated() {
            var sum = [Float](repeating: 0, count: layer.rows * layer.cols)
            for file in originals {
                for (k, value) in try file.readAll(layer.name).enumerated() { sum[k] += value }
            }
            let g = Matrix(rows: layer.rows, cols: layer.cols, storage: sum)
            let (r, c) = (layer.rows, layer.cols)
            let pieces: [Piece] = switch index % 4 {
            case 0: [Piece(rows: 0..<(r / 3), cols: 0..<c), Piece(rows: (r / 3)..<(r / 2), cols: 0..<c), Piece(rows: (r / 2)..<r, cols: 0..<c)]
            case 1: [Piece(rows: 0..<r, cols: 0..<(c / 4)), Piece(rows: 0..<r, cols: (c / 4)..<(c / 2 + 7)), Piece(rows: 0..<r, cols: (c / 2 + 7)..<c)]
            case 2: [Piece(rows: 0..<(2 * r / 3), cols: 0..<c), Piece(rows: (r / 3)..<r, cols: 0..<c), Piece(rows: 5..<(r - 9), cols: 11..<(c - 3))]
            default: [Piece(rows: 0..<r, cols: 0..<c, whole: true), Piece(rows: 0..<(r / 2), cols: 0..<(c / 2)), Piece(rows: (r / 2)..<r, cols: (c / 3)..<c)]
            }
            try Self.writePieces(pieces, of: g, name: layer.name, into: dirs, tag: "l\(index)-")
        }
        let blocks = try GradientFileSet(paths: dirs)
        #expect(blocks.layers.map(\.name) == reference.layers.map(\.name) && blocks.hasBlocks)
        let settings = JobSettings(lora: LoRAConfiguration(rank: 8, alpha: 16), mode: mode)
        let out = try Fixtures.scratch("minilm-out-\(mode)")
        let reports = try LocalJob(files: blocks, settings: settings, outputDirectory: out).run()
        let wholeOut = try Fixtures.scratch("minilm-whole-\(mode)")
        let wholeReports = try LocalJob(files: reference, settings: settings, outputDirectory: wholeOut).run()
        let results = try AdapterVerifier(files: reference, adapterDirectory: out, plantedSpectrumPaths: []).verify()
        #expect(results.count == 12)
        for result in results { #expect(result.ratio <= 1.01, "\(result.name): \(result.ratio)") }
        for (report, whole) in zip(reports, wholeReports) {
            let (s, t) = (report.singularValues[0], whole.singularValues[0])
            #expect(abs(s - t) <= 1e-3 * t, "\(report.name): s1 \(s) on blocks, \(t) whole")
        }
    }
}
