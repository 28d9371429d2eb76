import LoRAGADaemon
import NIOCore
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
@testable import LoRAGACoordinator

/// The coordinator's bookkeeping, driven by events alone: no sockets, no matrices, no clocks.
/// Every reliability rule of the README has its case here.
@Suite struct JobStateMachineTests {
    typealias Action = JobStateMachine.Action
    let layers = [
        GradientLayer(name: "a.weight", rows: 8, cols: 4, dtype: .f32),
        GradientLayer(name: "b.weight", rows: 6, cols: 6, dtype: .f32),
        GradientLayer(name: "c.weight", rows: 4, cols: 8, dtype: .f32),
    ]

    func hello(_ id: String, version: UInt16 = WireProtocol.version) -> Hello {
        Hello(protocolVersion: version, workerID: id, sessionNonce: 1, authProof: .zero)
    }

    /// Two workers on connections 1 and 2, both announced: the job is running.
    func running(_ mode: SVDMode, window: Int = 2) -> (JobStateMachine, [Action]) {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: mode, window: window))
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: layers)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let actions = machine.announced(on: 2, layers: layers)
        return (machine, actions)
    }

    func begins(_ actions: [Action]) -> [(Int, UInt32, UInt32)] {
        actions.compactMap {
            if case .send(let connection, .layerBegin(let begin)) = $0 { return (connection, begin.layerIndex, begin.attempt) }
            return nil
        }
    }

    func opened(_ actions: [Action]) -> [Int] {
        actions.compactMap { if case .openLayer(let index, _) = $0 { return index } else { return nil } }
    }

    func failure(_ actions: [Action]) -> JobError? {
        for action in actions { if case .failJob(let error) = action { return error } }
        return nil
    }

    /// A shard header of `rows` rows from `start` (the payload itself never reaches the machine).
    func shard(_ layer: Int, rows: Range<Int>, cols: Int, checksum: UInt64, attempt: UInt32 = 0) -> Shard {
        var shard = Shard(layerIndex: UInt32(layer), rowStart: UInt64(rows.lowerBound), rowCount: UInt32(rows.count), cols: UInt64(cols),
                          dtype: .f32, payload: ByteBuffer(), checksum: checksum, attempt: attempt)
        shard.uncompressedBytes = UInt64(rows.count * cols * 4)
        return shard
    }

    /// Sends `layer` whole from `connection` in shards of `step` rows; returns the matching commit.
    func send(_ machine: inout JobStateMachine, layer index: Int, from connection: Int, step: Int = 3, attempt: UInt32 = 0) -> LayerCommit {
        let layer = layers[index]
        var checksum = ShardChecksum()
        var count: UInt32 = 0
        for start in stride(from: 0, to: layer.rows, by: step) {
            let sum = UInt64(start * 7919 + connection)
            let header = shard(index, rows: start..<min(start + step, layer.rows), cols: layer.cols, checksum: sum, attempt: attempt)
            guard case .accept = machine.shardBegan(on: connection, header) else { Issue.record("shard refused"); break }
            #expect(machine.shardEnded(on: connection, checksumMatches: true) == [])
            checksum.addShard(sum)
            count += 1
        }
        return LayerCommit(layerIndex: UInt32(index), shardCount: count, rowCount: UInt64(layer.rows), checksum: checksum.value, attempt: attempt)
    }

    // MARK: - Joining

    @Test func jobStartsWhenEveryWorkerHasAnnouncedAndOpensAWindowOfLayers() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense, window: 2))
        #expect(machine.helloReceived(on: 1, hello("w0")) == [.sendJobSpec(1)])
        #expect(machine.announced(on: 1, layers: layers) == [])
        #expect(machine.phase == .gathering)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let actions = machine.announced(on: 2, layers: layers)
        #expect(machine.phase == .running)
        #expect(actions.contains(.layersKnown(layers)))
        #expect(opened(actions) == [0, 1])
        #expect(begins(actions).map { [$0.0, Int($0.1)] } == [[1, 0], [2, 0], [1, 1], [2, 1]])
    }

    @Test func duplicateIDAndWrongVersionAreRefusedWithoutHarmingTheJob() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense))
        _ = machine.helloReceived(on: 1, hello("w0"))
        let duplicate = machine.helloReceived(on: 2, hello("w0"))
        guard case .refuse(2, let error)? = duplicate.first else { Issue.record("\(duplicate)"); return }
        #expect(error.code == .duplicateWorker && error.message.contains("'w0' is already connected"))
        guard case .refuse(3, let versionError)? = machine.helloReceived(on: 3, hello("w9", version: 99)).first else { Issue.record("no refusal"); return }
        #expect(versionError.code == .badVersion)
        _ = machine.helloReceived(on: 4, hello("w1"))
        _ = machine.announced(on: 1, layers: layers)
        #expect(opened(machine.announced(on: 4, layers: layers)) == [0, 1])
    }

    /// Slot squatting: connections that only greet hold no slot, so they cannot keep real
    /// workers out; the slots go to the first workers whose announcements are valid.
    @Test func greetingAloneTakesNoSlot() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense))
        for squatter in 10..<13 { #expect(machine.helloReceived(on: squatter, hello("squatter\(squatter)")) == [.sendJobSpec(squatter)]) }
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.helloReceived(on: 2, hello("w1"))
        _ = machine.announced(on: 1, layers: layers)
        #expect(opened(machine.announced(on: 2, layers: layers)) == [0, 1])
        #expect(machine.workerIDs == ["w0", "w1"])
        // A squatter that announces now finds the slots taken; the job is untouched.
        guard case .refuse(10, let error)? = machine.announced(on: 10, layers: layers).first else { Issue.record("no refusal"); return }
        #expect(error.message.contains("is not one of them"))
        #expect(machine.phase == .running)
    }

    /// Shape conflicts are the job's: neither worker is privileged, both are named with both
    /// shapes, and the job fails at once instead of waiting out the gather timeout.
    @Test func conflictingWorkersFailTheJobAtOnceNamingBoth() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 3, mode: .dense))
        _ = machine.helloReceived(on: 1, hello("good"))
        _ = machine.announced(on: 1, layers: layers)
        _ = machine.helloReceived(on: 2, hello("bad"))
        var wrong = layers
        wrong[1] = GradientLayer(name: "b.weight", rows: 6, cols: 7, dtype: .f32)
        let actions = machine.announced(on: 2, layers: wrong)
        let error = failure(actions)
        #expect(error?.kind == .badInput)
        #expect(error?.message == "inconsistent workers: layer 'b.weight' is 6×7 on worker 'bad' but 6×6 on worker 'good'")
        #expect(actions.contains { if case .refuse(2, _) = $0 { return true } else { return false } })
        #expect(actions.contains { if case .send(1, .error) = $0 { return true } else { return false } })
        #expect(machine.phase == .failed(error!.message))
    }

    @Test func aMissingLayerIsAConflictToo() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense))
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: layers)
        _ = machine.helloReceived(on: 2, hello("short"))
        let error = failure(machine.announced(on: 2, layers: Array(layers.dropLast())))
        #expect(error?.message.contains("worker 'w0' announced 3 layers, worker 'short' has 2") == true
                || error?.message.contains("no layer 'c.weight'") == true)
    }

    @Test func resumedJobSkipsFinishedLayersAndFailsOnADifferentLayerSet() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 1, mode: .dense, window: 2), layers: layers, finished: [0])
        _ = machine.helloReceived(on: 1, hello("w0"))
        let actions = machine.announced(on: 1, layers: layers)
        #expect(opened(actions) == [1, 2])
        #expect(machine.finishedLayerNames == ["a.weight"])
        var other = JobStateMachine(configuration: .init(expectedWorkers: 1, mode: .dense), layers: layers)
        _ = other.helloReceived(on: 1, hello("w0"))
        let error = failure(other.announced(on: 1, layers: [layers[0]]))
        #expect(error?.message.contains("the resumed job's manifest") == true)
    }

    /// A worker that cannot read its files says so after greeting: the job fails at once.
    @Test func aWorkerReportingBadFilesFailsTheJobAtOnce() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense))
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: layers)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let error = failure(machine.workerReported(on: 2, ErrorMessage(code: .badData, message: "grads/x.safetensors: not a safetensors file")))
        #expect(error == JobError(.badInput, "worker 'w1' cannot take part: grads/x.safetensors: not a safetensors file"))
    }

    // MARK: - The exactly-once ledger

    @Test func layerFinalizesOnlyOnEveryMatchingCommitAndTheNextOneOpens() {
        var (machine, _) = running(.dense)
        let commit0 = send(&machine, layer: 0, from: 1)
        #expect(machine.committed(on: 1, commit0) == [])
        #expect(machine.committed(on: 1, commit0) == [])   // duplicate commit: ignored, not counted twice
        let commit1 = send(&machine, layer: 0, from: 2)
        #expect(machine.committed(on: 2, commit1) == [.finalizeLayer(0, layers[0])])
        let after = machine.layerFinalized(0)
        #expect(after.contains(.send(1, .layerDone(LayerDone(layerIndex: 0)))))
        #expect(opened(after) == [2])
        #expect(machine.openLayers == [1, 2])
        for layer in [1, 2] {
            _ = machine.committed(on: 1, send(&machine, layer: layer, from: 1))
            _ = machine.committed(on: 2, send(&machine, layer: layer, from: 2))
        }
        _ = machine.layerFinalized(1)
        #expect(machine.layerFinalized(2) == [.send(1, .layerDone(LayerDone(layerIndex: 2))), .send(2, .layerDone(LayerDone(layerIndex: 2))), .writeAdapter])
        #expect(machine.phase == .finishing)
        #expect(machine.adapterWritten() == [.jobDone(workers: [1, 2])])
        #expect(machine.phase == .finished)
    }

    @Test func aCommitThatDoesNotMatchWhatArrivedIsRefused() {
        var (machine, _) = running(.sketch)
        var commit = send(&machine, layer: 0, from: 1)
        commit.checksum &+= 1
        guard case .refuse(1, let error)? = machine.committed(on: 1, commit).first else { Issue.record("expected a refusal"); return }
        #expect(error.code == .badData && error.message.contains("checksum different"))
        // Rows missing: also refused.
        var (other, _) = running(.sketch)
        let partial = shard(0, rows: 0..<3, cols: 4, checksum: 5)
        _ = other.shardBegan(on: 1, partial)
        _ = other.shardEnded(on: 1, checksumMatches: true)
        var sums = ShardChecksum()
        sums.addShard(5)
        let early = LayerCommit(layerIndex: 0, shardCount: 1, rowCount: 3, checksum: sums.value)
        guard case .refuse(1, let short)? = other.committed(on: 1, early).first else { Issue.record("expected a refusal"); return }
        #expect(short.message.contains("3 of the 8 rows"))
    }

    @Test func aDamagedShardIsRefusedAndNeverCounts() {
        var (machine, _) = running(.dense)
        _ = machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 4, checksum: 9))
        guard case .refuse(1, let error)? = machine.shardEnded(on: 1, checksumMatches: false).first else { Issue.record("no refusal"); return }
        #expect(error.message.contains("do not match their checksum"))
        // The connection goes; the worker had rows in the sum, so the layer restarts for everyone.
        #expect(machine.connectionClosed(1).contains(.restartLayer(0, attempt: 1)))
    }

    @Test func shardsOutOfOrderOrOfTheWrongShapeAreRefused() {
        var (machine, _) = running(.dense)
        guard case .refuse(let gap) = machine.shardBegan(on: 1, shard(0, rows: 3..<6, cols: 4, checksum: 1)) else { Issue.record("accepted a gap"); return }
        #expect(gap.message.contains("expected rows from 0"))
        guard case .refuse(let wide) = machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 5, checksum: 1)) else { Issue.record("accepted a wrong width"); return }
        #expect(wide.code == .shapeMismatch)
        guard case .refuse(let early) = machine.shardBegan(on: 9, shard(0, rows: 0..<3, cols: 4, checksum: 1)) else { Issue.record("accepted before the handshake"); return }
        #expect(early.message.contains("before the handshake"))
    }

    @Test func denseLayerRestartsForEveryoneWhenAWorkerDropsMidLayerAndLateDataIsDropped() {
        var (machine, _) = running(.dense, window: 1)
        _ = machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 4, checksum: 1))   // w0 mid-shard
        let commit = send(&machine, layer: 0, from: 2)
        _ = machine.committed(on: 2, commit)
        let actions = machine.connectionClosed(1)
        #expect(actions.contains(.startRejoinTimer(worker: "w0")))
        #expect(actions.contains(.restartLayer(0, attempt: 1)))
        #expect(begins(actions).map { [$0.0, Int($0.1), Int($0.2)] } == [[2, 0, 1]])
        // Late data of the old attempt is dropped; w1's old commit no longer counts.
        #expect(machine.shardBegan(on: 2, shard(0, rows: 0..<3, cols: 4, checksum: 1)) == .ignore)
        #expect(machine.committed(on: 2, commit) == [])
        // w0 rejoins on a new connection and is told to send the layer under the new attempt.
        #expect(machine.helloReceived(on: 3, hello("w0")) == [.sendJobSpec(3)])
        let replay = machine.announced(on: 3, layers: layers)
        #expect(begins(replay).map { [$0.0, Int($0.1), Int($0.2)] } == [[3, 0, 1]])
        _ = machine.committed(on: 2, send(&machine, layer: 0, from: 2, attempt: 1))
        #expect(machine.committed(on: 3, send(&machine, layer: 0, from: 3, attempt: 1)) == [.finalizeLayer(0, layers[0])])
    }

    /// A shard of the old attempt that was mid-flight on another connection when the layer
    /// restarted completes without counting toward anything.
    @Test func aShardInFlightAcrossARestartDoesNotCount() {
        var (machine, _) = running(.dense, window: 1)
        _ = machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 4, checksum: 1))
        _ = machine.shardBegan(on: 2, shard(0, rows: 0..<3, cols: 4, checksum: 2))
        _ = machine.connectionClosed(1)                       // restart: attempt 1
        #expect(machine.shardEnded(on: 2, checksumMatches: true) == [])
        // w1's progress in attempt 1 starts from row 0: the old shard left no trace.
        guard case .accept = machine.shardBegan(on: 2, shard(0, rows: 0..<3, cols: 4, checksum: 3, attempt: 1)) else { Issue.record("refused"); return }
    }

    @Test func sketchLayerAlsoRestartsButAWorkerThatSentNothingCostsNothing() {
        var (machine, _) = running(.sketch, window: 1)
        _ = machine.shardBegan(on: 2, shard(0, rows: 0..<3, cols: 4, checksum: 1))
        #expect(!machine.connectionClosed(1).contains { if case .restartLayer = $0 { return true } else { return false } })
        _ = machine.helloReceived(on: 3, hello("w0"))
        #expect(begins(machine.announced(on: 3, layers: layers)).map { [$0.0, Int($0.1), Int($0.2)] } == [[3, 0, 0]])
        #expect(machine.connectionClosed(2).contains(.restartLayer(0, attempt: 1)))
    }

    @Test func aWorkerThatDoesNotComeBackFailsTheJobByName() {
        var (machine, _) = running(.dense)
        _ = machine.connectionClosed(2)
        let actions = machine.rejoinTimedOut(worker: "w1", after: 120)
        #expect(failure(actions)?.message.hasPrefix("worker 'w1' left and did not come back within 120 s") == true)
        #expect(failure(actions)?.kind == .interrupted)
        #expect(actions.contains { if case .send(1, .error) = $0 { return true } else { return false } })
        var (other, _) = running(.dense)
        _ = other.connectionClosed(2)
        _ = other.helloReceived(on: 3, hello("w1"))
        _ = other.announced(on: 3, layers: layers)
        #expect(other.rejoinTimedOut(worker: "w1", after: 120) == [])
    }

    @Test func aStrangerCannotJoinARunningJob() {
        var (machine, _) = running(.dense)
        guard case .refuse(7, let error)? = machine.helloReceived(on: 7, hello("stranger")).first else { Issue.record("no refusal"); return }
        #expect(error.message.contains("'stranger' is not one of them"))
    }

    // MARK: - The end of the job

    /// The last write failing must fail the job: workers are told, the engine gets the error
    /// (before, `fail` in the finished phase returned nothing and everyone waited forever).
    @Test func failingToWriteTheAdapterFailsTheJobAndTellsTheWorkers() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 1, mode: .dense, window: 1), layers: [layers[0]])
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: [layers[0]])
        _ = machine.committed(on: 1, send(&machine, layer: 0, from: 1))
        #expect(machine.layerFinalized(0).last == .writeAdapter)
        let actions = machine.fail(JobError("writing the adapter: No space left on device"))
        #expect(actions.contains(.send(1, .error(ErrorMessage(code: .jobFailed, message: "writing the adapter: No space left on device")))))
        #expect(actions.contains(.failJob(JobError("writing the adapter: No space left on device"))))
        #expect(machine.adapterWritten() == [])
    }

    /// A coordinator restarted on its output directory resumes from the manifest: finished
    /// layers are skipped, and workers are told which ones in their JobSpec.
    @Test func aRestartedCoordinatorResumesFromFinishedLayers() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .power, window: 1), layers: layers, finished: [0, 1])
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: layers)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let actions = machine.announced(on: 2, layers: layers)
        #expect(opened(actions) == [2])
        #expect(machine.finishedLayerNames == ["a.weight", "b.weight"])
    }

    // MARK: - Power rounds and stalls

    @Test func powerRoundsCountEachWorkerOnceAndResendToARejoiningWorker() {
        var (machine, opening) = running(.power, window: 1)
        #expect(opened(opening) == [0])
        let request = PowerRequest(layerIndex: 0, round: 0, side: .range, matrixRows: 4, matrixCols: 2, values: [Float](repeating: 1, count: 8))
        let sent = machine.powerRequestReady(layer: 0, request)
        #expect(sent == [.send(1, .powerRequest(request)), .send(2, .powerRequest(request))])
        #expect(machine.powerReplyArrived(on: 1, layer: 0, round: 0) == .accept(worker: "w0"))
        #expect(machine.powerReplyStored(layer: 0, worker: "w0") == [])
        #expect(machine.powerReplyArrived(on: 1, layer: 0, round: 0) == .ignore)   // duplicate
        _ = machine.connectionClosed(2)
        _ = machine.helloReceived(on: 3, hello("w1"))
        let replay = machine.announced(on: 3, layers: layers)
        #expect(replay.contains(.send(3, .powerRequest(request))))
        #expect(machine.powerReplyArrived(on: 3, layer: 0, round: 0) == .accept(worker: "w1"))
        #expect(machine.powerReplyStored(layer: 0, worker: "w1") == [.powerRoundComplete(0)])
        #expect(machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 4, checksum: 1)) == .refuse(ErrorMessage(code: .badData, message: "Shard in a power-mode job")))
    }

    /// What a silent worker still owes, for the stall warning that names it.
    @Test func outstandingWorkNamesWhatEachWorkerOwes() {
        var (machine, _) = running(.dense, window: 1)
        _ = machine.shardBegan(on: 1, shard(0, rows: 0..<3, cols: 4, checksum: 1))
        _ = machine.shardEnded(on: 1, checksumMatches: true)
        _ = machine.committed(on: 2, send(&machine, layer: 0, from: 2))
        #expect(machine.outstanding() == ["w0": ["rows 3..<8 of layer 'a.weight' (attempt 0) and its commit"]])
        var (power, _) = running(.power, window: 1)
        let request = PowerRequest(layerIndex: 0, round: 2, side: .corange, matrixRows: 8, matrixCols: 2, values: [Float](repeating: 1, count: 16))
        _ = power.powerRequestReady(layer: 0, request)
        _ = power.powerReplyStored(layer: 0, worker: "w1")
        #expect(power.outstanding() == ["w0": ["its reply to power round 2 of layer 'a.weight'"]])
    }

    // MARK: - Blocks: the ledger knows who holds which part of each layer

    /// Row shards of each layer over two workers, one of which also lacks layer c entirely
    /// (its share is empty): the job runs, each layer waits only for its holders.
    @Test func blockWorkersNeedOnlyCoverTheLayerTogether() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense, window: 3))
        let top = Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(rows: 0..<$0.rows / 2, cols: 0..<$0.cols)]) })
        var bottom = Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(rows: $0.rows / 2..<$0.rows, cols: 0..<$0.cols)]) })
        bottom["c.weight"] = [LayerRegion(rows: 0..<4, cols: 0..<8)]   // all of c
        var topOnly = top
        topOnly["c.weight"] = nil
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: Array(layers.prefix(2)), regions: topOnly)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let actions = machine.announced(on: 2, layers: layers, regions: bottom)
        #expect(opened(actions) == [0, 1, 2])
        // Layer c is w1's alone: w0 is not asked for it, and w1's commit finalizes it.
        #expect(begins(actions).filter { $0.1 == 2 }.map(\.0) == [2])
        #expect(machine.committed(on: 2, send(&machine, layer: 2, from: 2)) == [.finalizeLayer(2, layers[2])])
        #expect(machine.contributions().first { $0.layer == "a.weight" && $0.worker == "w0" }?.part == "rows 0..<4, cols 0..<4")
    }

    @Test func blocksThatLeaveAHoleFailTheJobNamingTheLayerAndTheRange() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .power))
        let left = Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(rows: 0..<$0.rows, cols: 0..<$0.cols / 2)]) })
        var right = Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(rows: 0..<$0.rows, cols: $0.cols / 2..<$0.cols)]) })
        right["b.weight"] = [LayerRegion(rows: 0..<5, cols: 3..<6)]   // row 5, columns 3..<6 uncovered
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: layers, regions: left)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let error = failure(machine.announced(on: 2, layers: layers, regions: right))
        #expect(error?.kind == .badInput)
        #expect(error?.message.contains("layer 'b.weight' (6×6) is not covered") == true, "\(String(describing: error))")
        #expect(error?.message.contains("rows 5..<6, cols 3..<6") == true, "\(String(describing: error))")
    }

    /// A data-parallel worker (whole layers) must hold every layer: a missing one would drop
    /// its partial sum silently.
    @Test func aWholeLayerWorkerMissingALayerIsAConflictEvenBesideBlockWorkers() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense))
        let all = Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(wholeOf: $0.rows, $0.cols)]) })
        _ = machine.helloReceived(on: 1, hello("blocks"))
        _ = machine.announced(on: 1, layers: layers, regions: all)
        _ = machine.helloReceived(on: 2, hello("whole"))
        let error = failure(machine.announced(on: 2, layers: Array(layers.prefix(2))))
        #expect(error?.message.contains("worker 'whole' has no layer 'c.weight'") == true, "\(String(describing: error))")
    }

    @Test func powerRoundsWaitOnlyForTheLayersHolders() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .power, window: 1))
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: [layers[1]], regions: [layers[1].name: [LayerRegion(wholeOf: 6, 6)]])
        _ = machine.helloReceived(on: 2, hello("w1"))
        _ = machine.announced(on: 2, layers: layers, regions: Dictionary(uniqueKeysWithValues: layers.map { ($0.name, [LayerRegion(wholeOf: $0.rows, $0.cols)]) }))
        let request = PowerRequest(layerIndex: 0, round: 0, side: .range, matrixRows: 4, matrixCols: 2, values: [Float](repeating: 1, count: 8))
        #expect(machine.powerRequestReady(layer: 0, request) == [.send(2, .powerRequest(request))])
        #expect(machine.powerReplyArrived(on: 2, layer: 0, round: 0) == .accept(worker: "w1"))
        #expect(machine.powerReplyStored(layer: 0, worker: "w1") == [.powerRoundComplete(0)])
    }
}
