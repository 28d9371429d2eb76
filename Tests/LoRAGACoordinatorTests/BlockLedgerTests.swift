import Foundation
import LoRAGADaemon
import NIOCore
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
@testable import LoRAGACoordinator

/// The ledger of workers holding blocks, driven by events alone (no sockets): each worker's
/// shards must walk the rectangles it announced, its commit must match them, and a restart
/// makes it resend them from the first.
@Suite struct BlockLedgerTests {
    typealias Action = JobStateMachine.Action
    /// 8×4 and 6×6.
    let layers = [
        GradientLayer(name: "a.weight", rows: 8, cols: 4, dtype: .f32),
        GradientLayer(name: "b.weight", rows: 6, cols: 6, dtype: .f32),
    ]

    func hello(_ id: String) -> Hello {
        Hello(protocolVersion: WireProtocol.version, workerID: id, sessionNonce: 1, authProof: .zero)
    }

    /// Column halves: w0 (connection 1) holds columns 0..<c/2 of every layer, w1 (connection 2) the rest.
    var left: [String: [LayerRegion]] { Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(rows: 0..<$0.rows, cols: 0..<$0.cols / 2)]) }) }
    var right: [String: [LayerRegion]] { Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(rows: 0..<$0.rows, cols: $0.cols / 2..<$0.cols)]) }) }

    func running(_ mode: SVDMode, _ first: [String: [LayerRegion]], _ second: [String: [LayerRegion]], window: Int = 2, allowUncovered: Bool = false) -> (JobStateMachine, [Action]) {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: mode, window: window, allowUncovered: allowUncovered))
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: layers, regions: first)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let actions = machine.announced(on: 2, layers: layers, regions: second)
        return (machine, actions)
    }

    func shard(_ layer: Int, rows: Range<Int>, cols: Range<Int>, checksum: UInt64, attempt: UInt32 = 0) -> Shard {
        var shard = Shard(layerIndex: UInt32(layer), rowStart: UInt64(rows.lowerBound), rowCount: UInt32(rows.count), cols: UInt64(cols.count),
                          dtype: .f32, payload: ByteBuffer(), checksum: checksum, attempt: attempt, colStart: UInt64(cols.lowerBound))
        shard.uncompressedBytes = UInt64(rows.count * cols.count * 4)
        return shard
    }

    /// Sends `parts` (each cut into bands of `step` rows) from `connection`; returns the commit
    /// matching what was sent, or nil when a shard was refused.
    func send(_ machine: inout JobStateMachine, layer: Int, parts: [LayerRegion], from connection: Int, step: Int = 3, attempt: UInt32 = 0) -> LayerCommit? {
        var checksum = ShardChecksum()
        var count: UInt32 = 0
        var rows = 0
        for part in parts {
            for start in stride(from: part.rows.lowerBound, to: part.rows.upperBound, by: step) {
                let band = start..<min(start + step, part.rows.upperBound)
                let sum = UInt64(start * 7919 + part.cols.lowerBound * 31 + connection)
                guard case .accept = machine.shardBegan(on: connection, shard(layer, rows: band, cols: part.cols, checksum: sum, attempt: attempt)) else { return nil }
                #expect(machine.shardEnded(on: connection, checksumMatches: true) == [])
                checksum.addShard(sum)
                count += 1
                rows += band.count
            }
        }
        return LayerCommit(layerIndex: UInt32(layer), shardCount: count, rowCount: UInt64(rows), checksum: checksum.value, attempt: attempt)
    }

    func refusal(_ verdict: JobStateMachine.ShardVerdict) -> ErrorMessage? {
        if case .refuse(let error) = verdict { return error }
        return nil
    }

    /// Version 4 workers send full-size power replies and shards without a column window: refused by version.
    @Test func aVersion4WorkerIsRefusedWithTheVersionError() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 1, mode: .dense))
        let actions = machine.helloReceived(on: 1, Hello(protocolVersion: 4, workerID: "old", sessionNonce: 1, authProof: .zero))
        guard case .refuse(1, let error)? = actions.first else { Issue.record("not refused: \(actions)"); return }
        #expect(error.code == .badVersion && error.message.contains("version 4 is not supported") && error.message.contains("version 5"), "\(error.message)")
    }

    @Test func blockWorkersShardsAreAcceptedInOrderAndTheirCommitsFinalize() throws {
        var (machine, actions) = running(.dense, left, right)
        #expect(actions.contains(.openLayer(0, layers[0])))
        let first = try #require(send(&machine, layer: 0, parts: left["a.weight"]!, from: 1))
        #expect(first.rowCount == 8 && first.shardCount == 3)
        #expect(machine.committed(on: 1, first) == [])
        let second = try #require(send(&machine, layer: 0, parts: right["a.weight"]!, from: 2))
        #expect(machine.committed(on: 2, second) == [.finalizeLayer(0, layers[0])])
    }

    /// Overlapping blocks of one worker (two micro-batch files, say) are sent once each entry:
    /// the disjoint cover of its blocks, band by band, left to right.
    @Test func overlappingBlocksOfOneWorkerAreSentAsTheirDisjointCover() throws {
        let blocks = [LayerRegion(rows: 0..<4, cols: 0..<4), LayerRegion(rows: 2..<6, cols: 2..<6)]
        let cover = LayerCoverage(rows: 6, cols: 6, regions: blocks).disjointCover
        #expect(cover == [LayerRegion(rows: 0..<2, cols: 0..<4), LayerRegion(rows: 2..<4, cols: 0..<6), LayerRegion(rows: 4..<6, cols: 2..<6)])
        var w0 = left
        w0["b.weight"] = blocks
        var w1 = right
        w1["b.weight"] = [LayerRegion(wholeOf: 6, 6)]
        var (machine, _) = running(.sketch, w0, w1)
        // The blocks as announced, not their cover: refused at the second band of the first block.
        var probe = machine
        #expect(send(&probe, layer: 1, parts: blocks, from: 1, step: 2) == nil)
        let commit = try #require(send(&machine, layer: 1, parts: cover, from: 1, step: 2))
        #expect(machine.committed(on: 1, commit) == [])
        let whole = try #require(send(&machine, layer: 1, parts: [LayerRegion(wholeOf: 6, 6)], from: 2))
        #expect(machine.committed(on: 2, whole) == [.finalizeLayer(1, layers[1])])
    }

    @Test func aShardOutsideTheWorkersAnnouncedRegionIsRefused() {
        var (machine, _) = running(.dense, left, right)
        // Full rows from a worker that announced columns 0..<2.
        let wide = refusal(machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 0..<4, checksum: 1)))
        #expect(wide?.code == .badData)
        #expect(wide?.message.contains("columns 0..<2") == true, "\(String(describing: wide))")
        // The other worker's columns.
        #expect(refusal(machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 2..<4, checksum: 1))) != nil)
        // Rows past its block, columns right.
        var (rows, _) = running(.dense, [layers[0].name: [LayerRegion(rows: 0..<4, cols: 0..<4)], layers[1].name: [LayerRegion(wholeOf: 6, 6)]],
                                [layers[0].name: [LayerRegion(rows: 4..<8, cols: 0..<4)], layers[1].name: [LayerRegion(wholeOf: 6, 6)]])
        #expect(refusal(rows.shardBegan(on: 1, shard(0, rows: 0..<6, cols: 0..<4, checksum: 1))) != nil)
        #expect(refusal(rows.shardBegan(on: 2, shard(0, rows: 0..<4, cols: 0..<4, checksum: 1))) != nil)
        // A shard after the worker's last part.
        #expect(send(&rows, layer: 0, parts: [LayerRegion(rows: 0..<4, cols: 0..<4)], from: 1) != nil)
        let extra = refusal(rows.shardBegan(on: 1, shard(0, rows: 4..<5, cols: 0..<4, checksum: 1)))
        #expect(extra?.message.contains("after every part") == true, "\(String(describing: extra))")
    }

    @Test func aCommitShortOfTheWorkersRegionsIsRefused() throws {
        var (machine, _) = running(.dense, left, right)
        // Five of its eight rows, then a commit that states exactly what arrived.
        let short = try #require(send(&machine, layer: 0, parts: [LayerRegion(rows: 0..<5, cols: 0..<2)], from: 1))
        let actions = machine.committed(on: 1, short)
        guard case .refuse(1, let error)? = actions.first else { Issue.record("not refused: \(actions)"); return }
        #expect(error.message.contains("5 of the 8 rows") == true, "\(error.message)")
        // A commit claiming more rows than arrived is refused too.
        var (other, _) = running(.dense, left, right)
        var full = try #require(send(&other, layer: 0, parts: left["a.weight"]!, from: 1))
        full.rowCount += 1
        guard case .refuse? = other.committed(on: 1, full).first else { Issue.record("not refused"); return }
    }

    /// A worker lost mid-layer: the layer restarts, a late shard of the old attempt is dropped,
    /// and both workers resend their blocks from the first under the new attempt.
    @Test func aRestartMidLayerResendsTheBlocksFromTheFirst() throws {
        var (machine, _) = running(.dense, left, right, window: 1)
        guard case .accept = machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 0..<2, checksum: 5)) else { Issue.record("refused"); return }
        _ = machine.shardEnded(on: 1, checksumMatches: true)
        guard case .accept = machine.shardBegan(on: 2, shard(0, rows: 0..<3, cols: 2..<4, checksum: 6)) else { Issue.record("refused"); return }
        _ = machine.shardEnded(on: 2, checksumMatches: true)
        let closed = machine.connectionClosed(2)
        #expect(closed.contains(.restartLayer(0, attempt: 1)))
        #expect(closed.contains(.send(1, .layerBegin(LayerBegin(layerIndex: 0, name: "a.weight", attempt: 1)))))
        // w0's next shard of attempt 0 is late data: dropped silently.
        #expect(machine.shardBegan(on: 1, shard(0, rows: 3..<6, cols: 0..<2, checksum: 7)) == .ignore)
        // w1 comes back with the same blocks and is asked for the layer again.
        _ = machine.helloReceived(on: 3, hello("w1"))
        let rejoined = machine.announced(on: 3, layers: layers, regions: right)
        #expect(rejoined.contains(.send(3, .layerBegin(LayerBegin(layerIndex: 0, name: "a.weight", attempt: 1)))))
        // Resuming mid-block under the new attempt is refused: a new attempt starts at the first part.
        var probe = machine
        #expect(refusal(probe.shardBegan(on: 1, shard(0, rows: 3..<6, cols: 0..<2, checksum: 7, attempt: 1))) != nil)
        let w0 = try #require(send(&machine, layer: 0, parts: left["a.weight"]!, from: 1, attempt: 1))
        let w1 = try #require(send(&machine, layer: 0, parts: right["a.weight"]!, from: 3, attempt: 1))
        #expect(machine.committed(on: 1, w0) == [])
        #expect(machine.committed(on: 3, w1) == [.finalizeLayer(0, layers[0])])
    }

    /// Power: each worker is sent the rows of X its share multiplies, and its reply must carry
    /// the rows of the product its share makes nonzero.
    @Test func powerRequestsAndRepliesFollowEachWorkersShare() throws {
        var (machine, _) = running(.power, left, right, window: 1)
        // Range side on a (8×4): X = P is 4×k; w0 holds columns 0..<2, w1 columns 2..<4.
        let p = (0..<8).map(Float.init)
        let request = PowerRequest(layerIndex: 0, round: 0, side: .range, matrixRows: 4, matrixCols: 2, values: p)
        let sent = machine.powerRequestReady(layer: 0, request).compactMap { action -> (Int, PowerRequest)? in
            if case .send(let connection, .powerRequest(let request)) = action { return (connection, request) }
            return nil
        }
        try #require(sent.map(\.0) == [1, 2])
        #expect(sent[0].1.spans == [0..<2] && sent[0].1.values == [0, 1, 2, 3])
        #expect(sent[1].1.spans == [2..<4] && sent[1].1.values == [4, 5, 6, 7])
        #expect(sent[0].1.fullValues == [0, 1, 2, 3, 0, 0, 0, 0])
        // Both hold every row of a: their range replies carry all 8 rows of Y.
        #expect(machine.replySpans(layer: 0, worker: "w0", side: .range) == [0..<8])
        #expect(machine.replySpans(layer: 0, worker: "w1", side: .corange) == [2..<4])
        #expect(machine.replySpans(layer: 0, worker: "w0", side: .corange) == [0..<2])
    }

    @Test func powerReplySpansRoundTripAndAreValidated() throws {
        let reply = PowerReply(layerIndex: 3, round: 1, side: .corange, rowsOf: (0..<12).map(Float.init), matrixRows: 6, matrixCols: 2, spans: [1..<2, 4..<6])
        #expect(reply.values == [2, 3, 8, 9, 10, 11])
        #expect(reply.fullValues == [0, 0, 2, 3, 0, 0, 0, 0, 8, 9, 10, 11])
        var buffer = ByteBuffer()
        reply.encode(into: &buffer)
        let decoded = try PowerReply(from: &buffer)
        #expect(decoded.spans == [1..<2, 4..<6] && decoded.values == reply.values)
        var bad = reply
        bad.spans = [4..<6, 1..<2]   // out of order
        #expect(throws: WireError.self) { try bad.validate() }
        bad.spans = [1..<2, 4..<7]   // past the matrix
        #expect(throws: WireError.self) { try bad.validate() }
    }

    @Test func uncoveredEntriesFailTheJobUnlessAllowed() {
        var hole = right
        hole["b.weight"] = [LayerRegion(rows: 0..<5, cols: 3..<6)]
        let (failed, actions) = running(.sketch, left, hole)
        #expect(actions.contains { if case .failJob = $0 { return true } else { return false } })
        #expect(failed.phase != .running)
        let (allowed, opened) = running(.sketch, left, hole, allowUncovered: true)
        #expect(allowed.phase == .running)
        #expect(opened.contains(.openLayer(1, layers[1])))
        let holes = allowed.uncoveredParts()
        #expect(holes.map(\.layer) == ["b.weight"] && holes.first?.uncovered.contains("rows 5..<6, cols 3..<6") == true, "\(holes)")
    }

    /// `--allow-uncovered` is one declaration: flag, environment and config key all reach the
    /// coordinator's options, and --help lists it.
    @Test func allowUncoveredIsASettingLikeTheOthers() throws {
        let none = try LayeredSettings(configFile: nil, environment: [:])
        #expect(try CoordinatorSettings(flags: ["out": "/o", "workers": "2"], layers: none).options.allowUncovered == false)
        let flag = try ResolvedSettings(schema: SettingsCatalog.coordinator, arguments: ["--out", "/o", "--workers", "2", "--allow-uncovered"], environment: [:])
        #expect(try CoordinatorSettings(flag).options.allowUncovered)
        let environment = try LayeredSettings(configFile: nil, environment: ["LORA_GA_ALLOW_UNCOVERED": "true"])
        #expect(try CoordinatorSettings(flags: ["out": "/o", "workers": "2"], layers: environment).options.allowUncovered)
        #expect(SettingsCatalog.coordinator.helpText().contains("--allow-uncovered"))
    }
}
