import LoRAGADaemon
import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGAWire
import LoRAGAWorker

/// Coordinator and workers end to end over real loopback TCP, in one test process.
@Suite(.serialized) struct DistributedJobTests {
    static let quiet: Logger = {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        return logger
    }()

    /// Three workers' worth of the MiniLM sample: w0 as is, and w1 split into two exact halves (F32).
    static func threeWorkerShares() throws -> [String] {
        let dir = try Fixtures.scratch("shares")
        let w1 = try SafeTensorsFile(path: Fixtures.minilm.appendingPathComponent("w1/grads.safetensors").path)
        var tensors: [(spec: SafeTensorsWriter.TensorSpec, values: [Float])] = []
        for info in w1.tensors {
            let halves = try w1.readAll(info.name).map { $0 / 2 }   // halving is exact in binary floating point
            tensors.append((.init(name: info.name, dtype: .f32, shape: info.shape), halves))
        }
        for half in ["a", "b"] {
            try FileManager.default.createDirectory(atPath: "\(dir)/\(half)", withIntermediateDirectories: true)
            try SafeTensorsWriter.write(path: "\(dir)/\(half)/grads.safetensors", tensors: tensors)
        }
        return [Fixtures.minilmWorkers[0], "\(dir)/a", "\(dir)/b"]
    }

    struct Run {
        var summary: CoordinatorSummary
        var workers: [Result<WorkerSummary, Error>]
    }

    /// Runs a coordinator and one worker per share; `beforeWorker` may delay or inject peers.
    static func run(mode: SVDMode, shares: [String], rank: Int = 8, out: String,
                    extraPeers: @escaping @Sendable (Int, CoordinatorEngine) async -> Void = { _, _ in }) async throws -> Run {
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: rank, alpha: Double(2 * rank)), mode: mode),
                                         expectedWorkers: shares.count, outputDirectory: out)
        options.gatherTimeout = .seconds(60)
        let server = CoordinatorServer(host: "127.0.0.1", port: 0, options: options, logger: quiet)
        let (ports, continuation) = AsyncStream<(Int, CoordinatorEngine)>.makeStream()
        async let summary = server.run { port, engine in continuation.yield((port, engine)) }
        var iterator = ports.makeAsyncIterator()
        let (port, engine) = await iterator.next()!
        let peersDone = Gate()
        let workers = await withTaskGroup(of: (Int, Result<WorkerSummary, Error>).self) { group in
            for (index, share) in shares.enumerated() {
                group.addTask {
                    if index > 0 {
                        // The first worker's announcement is the job's reference layer set; the
                        // others join after the extra peers have had their turn.
                        while await engine.joinedWorkers.count < 1 { try? await Task.sleep(for: .milliseconds(10)) }
                        await peersDone.wait()
                    }
                    var workerOptions = WorkerOptions(host: "127.0.0.1", port: port, id: "w\(index)", gradientPaths: [share])
                    workerOptions.connectTimeout = .seconds(20)
                    let client = WorkerClient(options: workerOptions, logger: quiet)
                    do { return (index, .success(try await client.run())) } catch { return (index, .failure(error)) }
                }
            }
            group.addTask {
                await extraPeers(port, engine)
                await peersDone.open()
                return (-1, .failure(CancellationError()))
            }
            var results: [Int: Result<WorkerSummary, Error>] = [:]
            for await (index, result) in group where index >= 0 { results[index] = result }
            return (0..<shares.count).map { results[$0]! }
        }
        return Run(summary: try await summary, workers: workers)
    }

    func verify(_ out: String, paths: [String] = Fixtures.minilmWorkers) throws -> [AdapterVerifier.LayerResult] {
        try AdapterVerifier(files: GradientFileSet(paths: paths), adapterDirectory: out, plantedSpectrumPaths: []).verify()
    }

    @Test(arguments: [SVDMode.dense, .sketch, .power])
    func threeWorkersMatchTheSingleProcessJob(mode: SVDMode) async throws {
        let shares = try Self.threeWorkerShares()
        let out = try Fixtures.scratch("dist-\(mode)")
        let run = try await Self.run(mode: mode, shares: shares, out: out)
        #expect(run.summary.layers == 12)
        for result in run.workers { #expect((try? result.get()) != nil, "\(result)") }
        let bound = mode == .sketch ? 1.05 : 1.01
        let distributed = try verify(out)
        for result in distributed { #expect(result.ratio <= bound, "\(result.name): \(result.ratio)") }
        // The same gradient in one process (w0 + w1 = w0 + w1/2 + w1/2): same fidelity to 1e-3;
        // bits differ because the shares are added, or multiplied, in another order.
        let local = try Fixtures.scratch("local-\(mode)")
        _ = try LocalJob(files: GradientFileSet(paths: Fixtures.minilmWorkers), settings: JobSettings(lora: LoRAConfiguration(rank: 8, alpha: 16), mode: mode), outputDirectory: local).run()
        for (a, b) in zip(distributed, try verify(local)) { #expect(abs(a.ratio - b.ratio) < 1e-3, "\(a.name)") }
        if mode == .power {
            // Power mode: each worker sends one F32 product per pass and layer — G·X (out×k) on
            // range passes, Gᵀ·X (in×k) on co-range passes — and never its gradient.
            let parameters = JobSettings(lora: LoRAConfiguration(rank: 8, alpha: 16), mode: .power).randomizedSVD
            let layers = try GradientFileSet(paths: Fixtures.minilmWorkers).layers
            let rangePasses = (parameters.passes + 1) / 2, coRangePasses = parameters.passes / 2
            let expectedBytes = layers.reduce(0) { total, layer in
                total + 4 * parameters.sketchWidth(rows: layer.rows, cols: layer.cols) * (rangePasses * layer.rows + coRangePasses * layer.cols)
            }
            let layerBytes = layers.reduce(0) { $0 + 4 * $1.rows * $1.cols }
            #expect(expectedBytes < layerBytes / 2, "the fixture's layers are large enough for the comparison to mean something")
            for result in run.workers {
                let summary = try result.get()
                #expect(summary.bytesSent == expectedBytes, "sent \(summary.bytesSent) bytes of products, expected \(expectedBytes)")
                #expect(summary.powerReplies == layers.count * parameters.passes)
                #expect(summary.layersSent == 0, "no layer's rows are sent in power mode")
            }
        }
    }

    @Test func twoWorkersInDenseModeGiveTheSingleProcessAdapterBitForBit() async throws {
        let out = try Fixtures.scratch("dist-bits")
        _ = try await Self.run(mode: .dense, shares: Fixtures.minilmWorkers, out: out)
        let local = try Fixtures.scratch("local-bits")
        _ = try LocalJob(files: GradientFileSet(paths: Fixtures.minilmWorkers), settings: JobSettings(lora: LoRAConfiguration(rank: 8, alpha: 16), mode: .dense), outputDirectory: local).run()
        // Two addends commute exactly, and the workers send F32 sums of BF16 values.
        #expect(try Data(contentsOf: URL(fileURLWithPath: out + "/adapter_model.safetensors")) == Data(contentsOf: URL(fileURLWithPath: local + "/adapter_model.safetensors")))
    }

    /// Workers that disagree on a layer's shape fail the job at once, naming both workers and
    /// both shapes, whichever of them announced first (before, the first was the reference,
    /// and the coordinator waited out its whole gather timeout).
    @Test func workersThatDisagreeOnAShapeFailTheJobAtOnceNamingBoth() async throws {
        let wrongShape = try Fixtures.scratch("wrong-shape")
        let w0 = try SafeTensorsFile(path: Fixtures.minilm.appendingPathComponent("w0/grads.safetensors").path)
        var tensors: [(spec: SafeTensorsWriter.TensorSpec, values: [Float])] = []
        for info in w0.tensors {
            let shape = info.name.hasSuffix("0.attention.self.key.weight") ? [info.shape[1] / 2, info.shape[0] * 2] : info.shape
            tensors.append((.init(name: info.name, dtype: .f32, shape: shape), try w0.readAll(info.name)))
        }
        try SafeTensorsWriter.write(path: wrongShape + "/grads.safetensors", tensors: tensors)
        let started = ContinuousClock.now
        do {
            let run = try await Self.run(mode: .dense, shares: [Fixtures.minilmWorkers[0], wrongShape], out: try Fixtures.scratch("shape-out"))
            Issue.record("the job finished: \(run.summary)")
        } catch let error as JobError {
            #expect(error.kind == .badInput)
            #expect(error.message.contains("layer 'encoder.layer.0.attention.self.key.weight' is"), "\(error)")
            #expect(error.message.contains("192×768") && error.message.contains("384×384"), "\(error)")
            #expect(error.message.contains("worker 'w0'") && error.message.contains("worker 'w1'"), "\(error)")
        }
        #expect(ContinuousClock.now - started < .seconds(60), "the coordinator must not wait out its gather timeout")
    }

    @Test func badPeersAreRefusedAndTheJobStillFinishes() async throws {
        let out = try Fixtures.scratch("bad-peers")
        let refusals = RefusalLog()
        let run = try await Self.run(mode: .dense, shares: Fixtures.minilmWorkers, out: out) { port, engine in
            while await engine.joinedWorkers.count < 1 { try? await Task.sleep(for: .milliseconds(10)) }
            // 1. garbage bytes from a stray client
            await refusals.record("garbage", await Self.sendGarbage(port: port))
            // 2. a second worker with an id already connected
            for (id, paths) in [("w0", Fixtures.minilmWorkers)] {
                var options = WorkerOptions(host: "127.0.0.1", port: port, id: id, gradientPaths: paths)
                options.connectTimeout = .seconds(5)
                do {
                    _ = try await WorkerClient(options: options, logger: Self.quiet).run()
                    await refusals.record(id, "finished?!")
                } catch {
                    await refusals.record(id, "\(error)")
                }
            }
        }
        #expect(run.summary.layers == 12)
        for result in try verify(out) { #expect(result.ratio <= 1.01) }
        let log = await refusals.entries
        // The coordinator greets every connection with a Challenge, then refuses the 1 GiB frame
        // from its length field alone (before the handshake only a small Hello may arrive) —
        // before allocating or waiting for the bytes — and hangs up.
        #expect(log["garbage"] == "Challenge, error(badData: protocol error: frame of 1073741824 bytes exceeds the limit of \(HandshakeGate.handshakeMaxFrameLength) bytes), closed by the coordinator", "\(log)")
        #expect(log["w0"]?.contains("'w0' is already connected") == true, "\(log)")
    }

    @Test func aNaNInAWorkersGradientFailsTheJobNamingWorkerLayerAndRow() async throws {
        let dir = try Fixtures.scratch("nan")
        var values = [Float](repeating: 0.5, count: 64 * 48)
        values[17 * 48 + 5] = .nan
        try SafeTensorsWriter.write(path: dir + "/grads.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [64, 48]), values)])
        let good = try Fixtures.scratch("nan-good")
        try SafeTensorsWriter.write(path: good + "/grads.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [64, 48]), [Float](repeating: 1, count: 64 * 48))])
        do {
            let run = try await Self.run(mode: .dense, shares: [good, dir], rank: 2, out: try Fixtures.scratch("nan-out"))
            Issue.record("the job finished: \(run.summary)")
        } catch {
            let message = "\(error)"
            #expect(message.contains("worker 'w1'") && message.contains("x.weight") && message.contains("row 17"), "\(message)")
        }
    }

    typealias Inbound = NIOAsyncChannelInboundStream<WireMessage>.AsyncIterator
    typealias Outbound = NIOAsyncChannelOutboundWriter<WireMessage>

    /// A coordinator with `options` and one hand-written client, "rogue", that greets,
    /// announces `layer` and then speaks `conversation` (which returns once it has sent what it
    /// wants to); the client then waits for the coordinator to hang up (at most 10 s). Returns
    /// how the job ended.
    func jobWithRogueClient(_ options: CoordinatorOptions, announcing layer: LayerInfo,
                            _ conversation: @escaping @Sendable (inout Inbound, Outbound) async throws -> Void) async throws -> Result<CoordinatorSummary, Error> {
        let server = CoordinatorServer(host: "127.0.0.1", port: 0, options: options, logger: Self.quiet)
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        async let summary = server.run { port, _ in continuation.yield(port) }
        var iterator = ports.makeAsyncIterator()
        let port = await iterator.next()!
        let channel = try await Fixtures.wireConnection(port: port)
        // The coordinator should hang up at once; if it does not, give up after 10 s.
        let watchdog = Task {
            try await Task.sleep(for: .seconds(10))
            try await channel.channel.close()
        }
        defer { watchdog.cancel() }
        try? await channel.executeThenClose { inbound, outbound in
            var messages = inbound.makeAsyncIterator()
            _ = try await messages.next()   // Challenge: the job has no secret
            try await outbound.write(.hello(Hello(workerID: "rogue", sessionNonce: 1)))
            _ = try await messages.next()   // JobSpec: only then may more than a Hello follow
            try await outbound.write(.announce(Announce(layers: [layer])))
            try await conversation(&messages, outbound)
            while try await messages.next() != nil {}   // until the coordinator hangs up
        }
        do { return .success(try await summary) } catch { return .failure(error) }
    }

    /// The coordinator does not trust workers' own checks: a hand-written client that skips
    /// them and sends a NaN in an F32 or a BF16 shard fails the job naming worker, layer and
    /// row, and no adapter is written.
    @Test(arguments: [TensorDType.f32, .bf16])
    func aNaNShardFromAWorkerThatSkipsItsChecksFailsTheJob(dtype: TensorDType) async throws {
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 2, alpha: 4), mode: .dense),
                                         expectedWorkers: 1, outputDirectory: try Fixtures.scratch("nan-raw-out"))
        options.payloadDType = dtype
        options.gatherTimeout = .seconds(30)
        options.rejoinTimeout = .seconds(2)   // if the NaN went unnoticed, the job fails on the hang-up instead of hanging
        let (rows, cols, badRow) = (64, 48, 17)
        let result = try await jobWithRogueClient(options, announcing: LayerInfo(name: "x.weight", rows: UInt64(rows), cols: UInt64(cols), sourceDType: .f32)) { messages, outbound in
            while let message = try await messages.next() {
                guard case .layerBegin(let begin) = message else { continue }
                var values = [Float](repeating: 0.25, count: rows * cols)
                values[badRow * cols + 7] = .nan
                var payload = ByteBufferAllocator().buffer(capacity: values.count * 4)
                payload.writeWithUnsafeMutableBytes(minimumWritableBytes: values.count * 4) { raw in
                    values.withUnsafeBufferPointer { FloatCodec.encode($0, as: dtype, into: raw) }
                    return values.count * dtype.byteSize
                }
                try await outbound.write(.shard(Shard(layerIndex: begin.layerIndex, rowStart: 0, rowCount: UInt32(rows), cols: UInt64(cols),
                                                      dtype: dtype == .f32 ? .f32 : .bf16, payload: payload, attempt: begin.attempt)))
                return
            }
        }
        switch result {
        case .success(let summary):
            Issue.record("the job finished: \(summary)")
        case .failure(let error):
            let message = "\(error)"
            #expect(message.contains("worker 'rogue'") && message.contains("x.weight") && message.contains("row \(badRow)"), "\(message)")
        }
        #expect(!FileManager.default.fileExists(atPath: options.outputDirectory + "/adapter_model.safetensors"))
    }

    /// The same in power mode: a hand-written client that answers a power round with a NaN in
    /// a row-shard reply (only its rows travel) fails the job naming worker, layer and the
    /// layer's row, not the row's place in the reply.
    @Test func aNaNInAPowerReplyFailsTheJobNamingTheLayersRow() async throws {
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 2, alpha: 4), mode: .power),
                                         expectedWorkers: 1, outputDirectory: try Fixtures.scratch("nan-power-out"))
        options.gatherTimeout = .seconds(30)
        options.rejoinTimeout = .seconds(2)
        options.allowUncovered = true   // the rogue holds rows 32..<64 only
        let (rows, cols, badRow) = (64, 48, 41)
        let share = LayerRegion(rows: 32..<64, cols: 0..<cols)
        let layer = LayerInfo(name: "x.weight", rows: UInt64(rows), cols: UInt64(cols), sourceDType: .f32, regions: [share])
        let result = try await jobWithRogueClient(options, announcing: layer) { messages, outbound in
            while let message = try await messages.next() {
                guard case .powerRequest(let request) = message, request.side == .range else { continue }
                let k = Int(request.matrixCols)
                var values = [Float](repeating: 0.5, count: 32 * k)
                values[(badRow - 32) * k + 1] = .nan
                try await outbound.write(.powerReply(PowerReply(layerIndex: request.layerIndex, round: request.round, side: .range,
                                                                rowsOf: [Float](repeating: 0, count: 32 * k) + values,
                                                                matrixRows: rows, matrixCols: k, spans: [32..<64])))
                return
            }
        }
        switch result {
        case .success(let summary):
            Issue.record("the job finished: \(summary)")
        case .failure(let error):
            let message = "\(error)"
            #expect(message.contains("worker 'rogue'") && message.contains("x.weight") && message.contains("row \(badRow)"), "\(message)")
        }
        #expect(!FileManager.default.fileExists(atPath: options.outputDirectory + "/adapter_model.safetensors"))
    }

    actor Gate {
        var isOpen = false
        func open() { isOpen = true }
        func wait() async { while !isOpen { try? await Task.sleep(for: .milliseconds(10)) } }
    }

    actor RefusalLog {
        var entries: [String: String] = [:]
        func record(_ key: String, _ value: String) { entries[key] = value }
    }

    /// Connects, sends a frame header announcing 1 GiB plus noise, and reports the frames the
    /// coordinator answered with and who closed the connection (after 20 s of silence: we did).
    static func sendGarbage(port: Int) async -> String {
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port) { channel in
                    channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
                }
            let gaveUp = Gate()
            let watchdog = Task {
                try await Task.sleep(for: .seconds(20))
                await gaveUp.open()
                try await channel.channel.close()
            }
            defer { watchdog.cancel() }
            return try await channel.executeThenClose { inbound, outbound in
                var bytes = ByteBuffer()
                bytes.writeInteger(UInt32(1 << 30), endianness: .little)
                bytes.writeBytes([UInt8](repeating: 0xAB, count: 64))
                try await outbound.write(bytes)
                var received = ByteBuffer()
                for try await chunk in inbound { received.writeImmutableBuffer(chunk) }
                var decoder = FrameDecoder()
                var frames: [String] = []
                while let message = try decoder.decode(buffer: &received) {
                    if case .error(let error) = message {
                        frames.append("error(\(error.code): \(error.message))")
                    } else {
                        frames.append("\(message.type)")
                    }
                }
                if received.readableBytes > 0 { frames.append("\(received.readableBytes) stray bytes") }
                let closer = await gaveUp.isOpen ? "closed by us after 20 s" : "closed by the coordinator"
                return (frames + [closer]).joined(separator: ", ")
            }
        } catch {
            return "failed: \(error)"
        }
    }
}
