import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing
import LoRAGACore
import LoRAGACoordinator
import LoRAGAWire

/// Shards reach the coordinator piece by piece. When a worker leaves mid-layer the layer
/// restarts under a new attempt; another worker's shard of the old attempt may still be
/// arriving, and none of its rows may land in the new attempt's sum.
@Suite struct RestartMidShardTests {
    let rows = 8
    let cols = 6

    func gradient(seed: Float) -> [Float] { (0..<(rows * cols)).map { Float($0 % 7) * 0.5 - seed + Float($0 / 5) * 0.125 } }

    /// The last piece of a shard, with the verdict the decoder would give it.
    func lastPiece(_ fields: Shard, from bytes: ByteBuffer, offset: Int) -> ShardPiece {
        ShardPiece(shard: fields, offset: offset, bytes: bytes.getSlice(at: offset, length: bytes.readableBytes - offset)!,
                   checksumMatches: bytes.withUnsafeReadableBytes { ShardChecksum.hash($0) } == fields.checksum)
    }

    /// The commit of a layer sent as the one shard `fields`.
    func commit(_ fields: Shard, attempt: UInt32) -> WireMessage {
        .layerCommit(LayerCommit(layerIndex: 0, shardCount: 1, rowCount: UInt64(rows),
                                 checksum: ShardChecksum.layer(shardChecksums: [fields.checksum]), attempt: attempt))
    }

    /// The shard's fields (payload left out) and its rows as bytes.
    func shard(_ values: [Float], attempt: UInt32) -> (fields: Shard, bytes: ByteBuffer) {
        let bytes = ByteBuffer(float32LittleEndian: values)
        var fields = Shard(layerIndex: 0, rowStart: 0, rowCount: UInt32(rows), cols: UInt64(cols), dtype: .f32, payload: bytes, attempt: attempt)
        fields.payload = ByteBuffer()
        return (fields, bytes)
    }

    enum Disturbance { case none, restart, damagedShard }

    /// Runs a two-worker dense job on one layer against the engine itself (no sockets);
    /// `.restart` interleaves the restart described above, `.damagedShard` has worker a send
    /// a shard whose bytes do not match its checksum first. Returns the adapter's bytes.
    func run(_ disturbance: Disturbance) async throws -> Data {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { group.shutdownGracefully { _ in } }
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 1, alpha: 2), mode: .dense),
                                         expectedWorkers: 2, outputDirectory: try Fixtures.scratch("restart-mid-shard"))
        options.rejoinTimeout = .seconds(30)
        let engine = try CoordinatorEngine(options: options, computeLoop: group.next(), logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        let announce = WireMessage.announce(Announce(layers: [LayerInfo(name: "x.weight", rows: UInt64(rows), cols: UInt64(cols), sourceDType: .f32)]))
        var outboxes: [JobStateMachine.ConnectionID: (AsyncStream<Outgoing>, AsyncStream<Outgoing>.Continuation)] = [:]
        func join(_ worker: String) async -> JobStateMachine.ConnectionID {
            let (outbox, continuation) = AsyncStream<Outgoing>.makeStream()
            let connection = await engine.connected(continuation)
            outboxes[connection] = (outbox, continuation)
            await engine.received(.hello(Hello(workerID: worker, sessionNonce: 1)), from: connection)
            await engine.received(announce, from: connection)
            return connection
        }
        func send(_ values: [Float], attempt: UInt32, on connection: JobStateMachine.ConnectionID, split: Int? = nil) async {
            let (fields, bytes) = shard(values, attempt: attempt)
            let cut = split ?? 0
            if cut > 0 {
                await engine.received(ShardPiece(shard: fields, offset: 0, bytes: bytes.getSlice(at: 0, length: cut)!), from: connection)
            }
            await engine.received(lastPiece(fields, from: bytes, offset: cut), from: connection)
            await engine.received(commit(fields, attempt: attempt), from: connection)
        }
        let (a, b) = (gradient(seed: 1), gradient(seed: -2))
        var workerA = await join("a")
        var workerB = await join("b")
        var attempt: UInt32 = 0
        switch disturbance {
        case .none:
            await send(b, attempt: attempt, on: workerB, split: 40)
        case .damagedShard:
            // Its rows are summed piece by piece before the verdict comes with the last piece.
            let (fields, bytes) = shard(a, attempt: 0)
            var damaged = bytes
            damaged.setInteger(bytes.getInteger(at: 130, as: UInt8.self)! ^ 0x40, at: 130)
            await engine.received(ShardPiece(shard: fields, offset: 0, bytes: damaged.getSlice(at: 0, length: 100)!), from: workerA)
            await engine.received(lastPiece(fields, from: damaged, offset: 100), from: workerA)
            // The engine answers within `received`: end the stream and read what it holds.
            let (outbox, continuation) = outboxes[workerA]!
            continuation.finish()
            var refusal: String?
            for await item in outbox {
                if case .message(.error(let error)) = item { refusal = error.message }
            }
            #expect(refusal?.contains("do not match their checksum") == true, "\(String(describing: refusal))")
            await engine.closed(workerA)
            workerA = await join("a")
            attempt = 1
            await send(b, attempt: attempt, on: workerB, split: 40)
        case .restart:
            // a is half-way through its shard, b sent a few rows of its own and left. (The old
            // shard's values differ from the resent ones so that any stale row shows in the sum.)
            let (fieldsA, bytesA) = shard(gradient(seed: 7), attempt: 0)
            await engine.received(ShardPiece(shard: fieldsA, offset: 0, bytes: bytesA.getSlice(at: 0, length: 100)!), from: workerA)
            let (fieldsB, bytesB) = shard(b, attempt: 0)
            await engine.received(ShardPiece(shard: fieldsB, offset: 0, bytes: bytesB.getSlice(at: 0, length: 60)!), from: workerB)
            await engine.closed(workerB)                       // layer 0 restarts as attempt 1
            workerB = await join("b")
            attempt = 1
            // b's new attempt arrives first (its sum is made), then the rest of a's old shard.
            let (fieldsB1, bytesB1) = shard(b, attempt: 1)
            await engine.received(ShardPiece(shard: fieldsB1, offset: 0, bytes: bytesB1.getSlice(at: 0, length: 40)!), from: workerB)
            await engine.received(lastPiece(fieldsA, from: bytesA, offset: 100), from: workerA)
            await engine.received(lastPiece(fieldsB1, from: bytesB1, offset: 40), from: workerB)
            await engine.received(commit(fieldsB1, attempt: 1), from: workerB)
        }
        await send(a, attempt: attempt, on: workerA, split: 100)
        // A stale row counted as progress would leave the layer unfinishable: stop after 10 s.
        let watchdog = Task {
            try await Task.sleep(for: .seconds(10))
            await engine.shutdown(reason: "the test's 10 s limit")
        }
        defer { watchdog.cancel() }
        let summary = try await engine.result()
        #expect(summary.layers == 1)
        return try Data(contentsOf: URL(fileURLWithPath: options.outputDirectory + "/adapter_model.safetensors"))
    }

    @Test("rows of a shard from before a restart never reach the restarted layer's sum")
    func staleShardAfterRestart() async throws {
        let undisturbed = try await run(.none)
        let disturbed = try await run(.restart)
        #expect(disturbed == undisturbed, "two workers' dense sum is bit-reproducible, so the adapters must match byte for byte")
    }

    @Test("a shard whose bytes do not match its checksum is refused, and none of its rows stay in the sum")
    func damagedShardIsResent() async throws {
        let undisturbed = try await run(.none)
        let damaged = try await run(.damagedShard)
        #expect(damaged == undisturbed)
    }
}
