import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing
import LoRAGACore
import LoRAGACoordinator
import LoRAGAWire

/// Two workers each holding a column half of one layer, against the engine itself (no
/// sockets): when one leaves mid-block, the layer restarts, both resend their blocks, and
/// no column of the old attempt reaches the new sum — the adapter is the undisturbed one.
@Suite struct RestartMidBlockTests {
    let rows = 8
    let cols = 6
    /// Worker a holds columns 0..<3, worker b columns 3..<6.
    var halves: [String: Range<Int>] { ["a": 0..<3, "b": 3..<6] }

    func block(seed: Float) -> [Float] { (0..<(rows * 3)).map { Float($0 % 5) * 0.5 - seed + Float($0 / 4) * 0.125 } }

    func shard(_ values: [Float], columns: Range<Int>, attempt: UInt32) -> (fields: Shard, bytes: ByteBuffer) {
        let bytes = ByteBuffer(float32LittleEndian: values)
        var fields = Shard(layerIndex: 0, rowStart: 0, rowCount: UInt32(rows), cols: UInt64(columns.count), dtype: .f32, payload: bytes,
                           attempt: attempt, colStart: UInt64(columns.lowerBound))
        fields.payload = ByteBuffer()
        return (fields, bytes)
    }

    func lastPiece(_ fields: Shard, from bytes: ByteBuffer, offset: Int) -> ShardPiece {
        ShardPiece(shard: fields, offset: offset, bytes: bytes.getSlice(at: offset, length: bytes.readableBytes - offset)!,
                   checksumMatches: bytes.withUnsafeReadableBytes { ShardChecksum.hash($0) } == fields.checksum)
    }

    func commit(_ fields: Shard, attempt: UInt32) -> WireMessage {
        .layerCommit(LayerCommit(layerIndex: 0, shardCount: 1, rowCount: UInt64(rows),
                                 checksum: ShardChecksum.layer(shardChecksums: [fields.checksum]), attempt: attempt))
    }

    func run(restart: Bool) async throws -> Data {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { group.shutdownGracefully { _ in } }
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 1, alpha: 2), mode: .dense),
                                         expectedWorkers: 2, outputDirectory: try Fixtures.scratch("restart-mid-block"))
        options.rejoinTimeout = .seconds(30)
        let engine = try CoordinatorEngine(options: options, computeLoop: group.next(), logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        var outboxes: [AsyncStream<Outgoing>.Continuation] = []
        func join(_ worker: String) async -> JobStateMachine.ConnectionID {
            let (_, continuation) = AsyncStream<Outgoing>.makeStream()
            outboxes.append(continuation)
            let connection = await engine.connected(continuation)
            await engine.received(.hello(Hello(workerID: worker, sessionNonce: 1)), from: connection)
            let region = LayerRegion(rows: 0..<rows, cols: halves[worker]!)
            await engine.received(.announce(Announce(layers: [LayerInfo(name: "x.weight", rows: UInt64(rows), cols: UInt64(cols), sourceDType: .f32, regions: [region])])), from: connection)
            return connection
        }
        func send(_ values: [Float], worker: String, attempt: UInt32, on connection: JobStateMachine.ConnectionID, split: Int) async {
            let (fields, bytes) = shard(values, columns: halves[worker]!, attempt: attempt)
            await engine.received(ShardPiece(shard: fields, offset: 0, bytes: bytes.getSlice(at: 0, length: split)!), from: connection)
            await engine.received(lastPiece(fields, from: bytes, offset: split), from: connection)
            await engine.received(commit(fields, attempt: attempt), from: connection)
        }
        let (a, b) = (block(seed: 1), block(seed: -2))
        let workerA = await join("a")
        var workerB = await join("b")
        var attempt: UInt32 = 0
        if restart {
            // a is half-way through its block, b sent part of its own and left: the layer restarts.
            let (fieldsA, bytesA) = shard(block(seed: 7), columns: halves["a"]!, attempt: 0)
            await engine.received(ShardPiece(shard: fieldsA, offset: 0, bytes: bytesA.getSlice(at: 0, length: 48)!), from: workerA)
            let (fieldsB, bytesB) = shard(b, columns: halves["b"]!, attempt: 0)
            await engine.received(ShardPiece(shard: fieldsB, offset: 0, bytes: bytesB.getSlice(at: 0, length: 36)!), from: workerB)
            await engine.closed(workerB)
            workerB = await join("b")
            attempt = 1
            // b's new attempt begins, then the rest of a's old block arrives (dropped), then b finishes.
            let (fieldsB1, bytesB1) = shard(b, columns: halves["b"]!, attempt: 1)
            await engine.received(ShardPiece(shard: fieldsB1, offset: 0, bytes: bytesB1.getSlice(at: 0, length: 24)!), from: workerB)
            await engine.received(lastPiece(fieldsA, from: bytesA, offset: 48), from: workerA)
            await engine.received(lastPiece(fieldsB1, from: bytesB1, offset: 24), from: workerB)
            await engine.received(commit(fieldsB1, attempt: 1), from: workerB)
        } else {
            await send(b, worker: "b", attempt: attempt, on: workerB, split: 40)
        }
        await send(a, worker: "a", attempt: attempt, on: workerA, split: 52)
        let watchdog = Task {
            try await Task.sleep(for: .seconds(10))
            await engine.shutdown(reason: "the test's 10 s limit")
        }
        defer { watchdog.cancel() }
        let summary = try await engine.result()
        for outbox in outboxes { outbox.finish() }
        #expect(summary.layers == 1)
        return try Data(contentsOf: URL(fileURLWithPath: options.outputDirectory + "/adapter_model.safetensors"))
    }

    @Test func columnsOfABlockFromBeforeARestartNeverReachTheRestartedSum() async throws {
        let undisturbed = try await run(restart: false)
        let disturbed = try await run(restart: true)
        #expect(disturbed == undisturbed, "two column blocks sum exactly, so the adapters must match byte for byte")
    }
}
