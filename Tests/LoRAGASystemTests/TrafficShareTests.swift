import Foundation
import Logging
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGAWorker

/// Coordinator and workers over loopback TCP, in one process, on gradients cut into blocks:
/// a worker's traffic follows its share of each layer (dense and sketch shards carry only its
/// rectangles; power replies only the rows its share makes nonzero), and the adapter is as
/// good as from the whole gradient.
@Suite(.serialized) struct TrafficShareTests {
    typealias Piece = GradientBlocksTests.Piece

    /// Two layers of different shapes, each a rank-24 signal plus noise.
    static let shapes = [("x.weight", 256, 192), ("y.weight", 160, 224)]

    static func gradient(_ index: Int) -> Matrix {
        GradientBlocksTests.gradient(rows: shapes[index].1, cols: shapes[index].2, seed: UInt64(11 + index))
    }

    /// One directory per piece function's result, written from each layer's gradient.
    static func write(_ label: String, workers: Int, pieces: (Int, Int) -> [Piece]) throws -> [String] {
        let dirs = try GradientBlocksTests.directories(workers, label)
        for (index, shape) in shapes.enumerated() {
            try GradientBlocksTests.writePieces(pieces(shape.1, shape.2), of: gradient(index), name: shape.0, into: dirs, tag: "l\(index)-")
        }
        return dirs
    }

    /// Every layer whole, in one plain file (no blocks).
    static func whole() throws -> [String] {
        let dir = try Fixtures.scratch("traffic-whole")
        try SafeTensorsWriter.write(path: dir + "/grads.safetensors", tensors: shapes.indices.map { index in
            (.init(name: shapes[index].0, dtype: .f32, shape: [shapes[index].1, shapes[index].2]), gradient(index).storage)
        })
        return [dir]
    }

    static func rowHalves() throws -> [String] {
        try write("traffic-rows", workers: 2) { r, c in [Piece(rows: 0..<(r / 2), cols: 0..<c), Piece(rows: (r / 2)..<r, cols: 0..<c)] }
    }

    static func columnHalves() throws -> [String] {
        try write("traffic-cols", workers: 2) { r, c in [Piece(rows: 0..<r, cols: 0..<(c / 2)), Piece(rows: 0..<r, cols: (c / 2)..<c)] }
    }

    /// Runs a coordinator and one worker per directory.
    static func run(mode: SVDMode, shares: [String], out: String, allowUncovered: Bool = false,
                    payloadDType: TensorDType = .f32, compress: Bool = false) async throws -> (CoordinatorSummary, [WorkerSummary]) {
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 8, alpha: 16), mode: mode),
                                         expectedWorkers: shares.count, outputDirectory: out)
        options.gatherTimeout = .seconds(60)
        options.allowUncovered = allowUncovered
        options.payloadDType = payloadDType
        options.compressShards = compress
        let server = CoordinatorServer(host: "127.0.0.1", port: 0, options: options, logger: DistributedJobTests.quiet)
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        async let summary = server.run { port, _ in continuation.yield(port) }
        var iterator = ports.makeAsyncIterator()
        let port = await iterator.next()!
        let workers = await withTaskGroup(of: (Int, Result<WorkerSummary, Error>).self) { group in
            for (index, share) in shares.enumerated() {
                group.addTask {
                    var workerOptions = WorkerOptions(host: "127.0.0.1", port: port, id: "w\(index)", gradientPaths: [share])
                    workerOptions.connectTimeout = .seconds(20)
                    do { return (index, .success(try await WorkerClient(options: workerOptions, logger: DistributedJobTests.quiet).run())) } catch { return (index, .failure(error)) }
                }
            }
            var results: [Int: Result<WorkerSummary, Error>] = [:]
            for await (index, result) in group { results[index] = result }
            return (0..<shares.count).map { results[$0]! }
        }
        // The coordinator's outcome first: a failed job throws its own error, naming the cause.
        let coordinator = try await summary
        return (coordinator, try workers.map { try $0.get() })
    }

    func ratios(_ out: String, whole: [String]) throws -> [(String, Double)] {
        try AdapterVerifier(files: GradientFileSet(paths: whole), adapterDirectory: out, plantedSpectrumPaths: []).verify().map { ($0.name, $0.ratio) }
    }

    /// Dense and sketch: each worker holding half of every layer (rows or columns) sends about
    /// half of what a whole-layer worker sends, and the adapter matches the whole gradient.
    @Test(arguments: [SVDMode.dense, .sketch])
    func shardsCarryOnlyTheWorkersShare(mode: SVDMode) async throws {
        let whole = try Self.whole()
        let (_, single) = try await Self.run(mode: mode, shares: whole, out: try Fixtures.scratch("traffic-whole-\(mode)"))
        let wholeBytes = single[0].bytesSent
        let layerBytes = Self.shapes.reduce(0) { $0 + 4 * $1.1 * $1.2 }
        #expect(wholeBytes == layerBytes, "a whole-layer worker sends every layer once in F32")
        for (label, shares) in [("rows", try Self.rowHalves()), ("cols", try Self.columnHalves())] {
            let out = try Fixtures.scratch("traffic-\(label)-\(mode)")
            let (summary, workers) = try await Self.run(mode: mode, shares: shares, out: out)
            #expect(summary.layers == 2)
            for (index, worker) in workers.enumerated() {
                #expect(Double(worker.bytesSent) <= 0.6 * Double(wholeBytes), "\(label) worker \(index) sent \(worker.bytesSent) bytes, a whole-layer worker \(wholeBytes)")
                #expect(worker.bytesSent == layerBytes / 2, "\(label) worker \(index): exactly its half in F32")
            }
            #expect(summary.bytesReceived == layerBytes)
            let bound = mode == .sketch ? 1.05 : 1.01
            for (name, ratio) in try ratios(out, whole: whole) { #expect(ratio <= bound, "\(label) \(mode) \(name): \(ratio)") }
        }
    }

    /// Column blocks in BF16, zstd-compressed (the path that encodes a narrow part through a
    /// buffer): each worker still sends about half of a whole-layer worker's bytes.
    @Test(arguments: [SVDMode.dense, .sketch])
    func narrowPartsTravelCompressedInBF16(mode: SVDMode) async throws {
        let whole = try Self.whole()
        let (_, single) = try await Self.run(mode: mode, shares: whole, out: try Fixtures.scratch("traffic-whole-bf16-\(mode)"), payloadDType: .bf16, compress: true)
        let out = try Fixtures.scratch("traffic-cols-bf16-\(mode)")
        let (summary, workers) = try await Self.run(mode: mode, shares: try Self.columnHalves(), out: out, payloadDType: .bf16, compress: true)
        #expect(summary.layers == 2)
        for (index, worker) in workers.enumerated() {
            #expect(Double(worker.bytesSent) <= 0.6 * Double(single[0].bytesSent), "worker \(index) sent \(worker.bytesSent) bytes, a whole-layer worker \(single[0].bytesSent)")
        }
        let bound = mode == .sketch ? 1.05 : 1.01
        for (name, ratio) in try ratios(out, whole: whole) { #expect(ratio <= bound, "bf16 \(mode) \(name): \(ratio)") }
    }

    /// Power: a worker's replies carry the rows its share makes nonzero — its rows of Y = G·P on
    /// range passes, its columns of Z = Gᵀ·Q on co-range passes — so a row half sends half of
    /// the range products and a column half half of the co-range ones; 2-D quarters send half of both.
    @Test func powerRepliesCarryOnlyTheWorkersRowsOrColumns() async throws {
        let parameters = JobSettings(lora: LoRAConfiguration(rank: 8, alpha: 16), mode: .power).randomizedSVD
        let rangePasses = (parameters.passes + 1) / 2, coRangePasses = parameters.passes / 2
        /// Bytes of replies for a worker covering `rows` rows and `cols` columns of each layer (as fractions).
        func expected(rows: (Int) -> Int, cols: (Int) -> Int) -> Int {
            Self.shapes.reduce(0) { total, shape in
                total + 4 * parameters.sketchWidth(rows: shape.1, cols: shape.2) * (rangePasses * rows(shape.1) + coRangePasses * cols(shape.2))
            }
        }
        let whole = try Self.whole()
        let (_, single) = try await Self.run(mode: .power, shares: whole, out: try Fixtures.scratch("traffic-whole-power"))
        let wholeBytes = expected(rows: { $0 }, cols: { $0 })
        #expect(single[0].bytesSent == wholeBytes)
        let quarters = try Self.write("traffic-quarters", workers: 4) { r, c in
            [Piece(rows: 0..<(r / 2), cols: 0..<(c / 2)), Piece(rows: 0..<(r / 2), cols: (c / 2)..<c),
             Piece(rows: (r / 2)..<r, cols: 0..<(c / 2)), Piece(rows: (r / 2)..<r, cols: (c / 2)..<c)]
        }
        let layouts: [(String, [String], Int)] = [
            ("rows", try Self.rowHalves(), expected(rows: { $0 / 2 }, cols: { $0 })),
            ("cols", try Self.columnHalves(), expected(rows: { $0 }, cols: { $0 / 2 })),
            ("quarters", quarters, expected(rows: { $0 / 2 }, cols: { $0 / 2 })),
        ]
        for (label, shares, bytes) in layouts {
            let out = try Fixtures.scratch("traffic-\(label)-power")
            let (summary, workers) = try await Self.run(mode: .power, shares: shares, out: out)
            #expect(summary.layers == 2)
            for (index, worker) in workers.enumerated() {
                #expect(worker.bytesSent == bytes, "\(label) worker \(index) sent \(worker.bytesSent) bytes of products, its share makes \(bytes)")
                #expect(worker.bytesSent < wholeBytes)
            }
            if label == "quarters" { for worker in workers { #expect(Double(worker.bytesSent) <= 0.6 * Double(wholeBytes)) } }
            for (name, ratio) in try ratios(out, whole: whole) { #expect(ratio <= 1.01, "\(label) power \(name): \(ratio)") }
        }
    }

    /// Blocks that leave part of a layer uncovered fail the daemon job naming the layer; with
    /// `allowUncovered` the hole counts as zeros and the job finishes.
    @Test(arguments: [SVDMode.dense, .sketch, .power])
    func uncoveredBlocksFailUnlessAllowed(mode: SVDMode) async throws {
        let shares = try Self.write("traffic-hole-\(mode)", workers: 2) { r, c in
            [Piece(rows: 0..<(r / 2), cols: 0..<c), Piece(rows: (r / 2 + 8)..<r, cols: 0..<c)]   // rows r/2..<r/2+8 held by nobody
        }
        do {
            _ = try await Self.run(mode: mode, shares: shares, out: try Fixtures.scratch("traffic-hole-refused-\(mode)"))
            Issue.record("a job with an uncovered layer finished")
        } catch {
            #expect("\(error)".contains("x.weight") && "\(error)".contains("not covered"), "\(error)")
        }
        let out = try Fixtures.scratch("traffic-hole-allowed-\(mode)")
        let (summary, _) = try await Self.run(mode: mode, shares: shares, out: out, allowUncovered: true)
        #expect(summary.layers == 2)
        #expect(FileManager.default.fileExists(atPath: out + "/adapter_model.safetensors"))
    }
}
