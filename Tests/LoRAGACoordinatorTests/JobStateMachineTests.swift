import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
@testable import LoRAGACoordinator

/// The coordinator's bookkeeping, driven by events alone: no sockets, no matrices.
@Suite struct JobStateMachineTests {
    typealias Action = JobStateMachine.Action
    let layers = [
        GradientLayer(name: "a.weight", rows: 8, cols: 4, dtype: "F32"),
        GradientLayer(name: "b.weight", rows: 6, cols: 6, dtype: "F32"),
        GradientLayer(name: "c.weight", rows: 4, cols: 8, dtype: "F32"),
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

    @Test func jobStartsWhenEveryWorkerHasAnnouncedAndOpensAWindowOfLayers() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense, window: 2))
        #expect(machine.helloReceived(on: 1, hello("w0")) == [.sendJobSpec(1)])
        #expect(machine.announced(on: 1, layers: layers) == [.layersKnown(layers)])
        #expect(machine.phase == .gathering)
        _ = machine.helloReceived(on: 2, hello("w1"))
        let actions = machine.announced(on: 2, layers: layers)
        #expect(machine.phase == .running)
        #expect(actions.contains(.openLayer(0)) && actions.contains(.openLayer(1)) && !actions.contains(.openLayer(2)))
        #expect(begins(actions).map { [$0.0, Int($0.1)] } == [[1, 0], [2, 0], [1, 1], [2, 1]])
    }

    @Test func layerFinalizesOnlyWhenEveryWorkerCommittedAndTheNextOneOpens() {
        var (machine, _) = running(.dense)
        #expect(machine.shardArrived(on: 1, layer: 0, attempt: 0) == .accept(worker: "w0"))
        #expect(machine.committed(on: 1, layer: 0, attempt: 0, verified: true) == [])
        #expect(machine.committed(on: 1, layer: 0, attempt: 0, verified: true) == [])   // duplicate commit: ignored
        #expect(machine.committed(on: 2, layer: 0, attempt: 0, verified: true) == [.finalizeLayer(0)])
        let after = machine.layerFinalized(0)
        #expect(after.contains(.send(1, .layerDone(LayerDone(layerIndex: 0)))))
        #expect(after.contains(.openLayer(2)))
        #expect(machine.openLayers == [1, 2])
        // Finishing the rest finishes the job.
        for layer in [1, 2] {
            _ = machine.committed(on: 1, layer: layer, attempt: 0, verified: true)
            _ = machine.committed(on: 2, layer: layer, attempt: 0, verified: true)
        }
        _ = machine.layerFinalized(1)
        #expect(machine.layerFinalized(2).contains(.finishJob))
        #expect(machine.phase == .finished)
    }

    @Test func aCommitThatDoesNotMatchItsShardsIsRefused() {
        var (machine, _) = running(.sketch)
        let actions = machine.committed(on: 1, layer: 0, attempt: 0, verified: false)
        guard case .refuse(1, let error)? = actions.first else { Issue.record("expected a refusal, got \(actions)"); return }
        #expect(error.code == .badData)
    }

    @Test func duplicateIDWrongVersionAndExtraWorkersAreRefusedWithoutHarmingTheJob() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense))
        _ = machine.helloReceived(on: 1, hello("w0"))
        let duplicate = machine.helloReceived(on: 2, hello("w0"))
        guard case .refuse(2, let error)? = duplicate.first else { Issue.record("\(duplicate)"); return }
        #expect(error.code == .duplicateWorker && error.message.contains("'w0' is already connected"))
        guard case .refuse(3, let versionError)? = machine.helloReceived(on: 3, hello("w9", version: 99)).first else { Issue.record("no refusal"); return }
        #expect(versionError.code == .badVersion)
        _ = machine.helloReceived(on: 4, hello("w1"))
        guard case .refuse(5, let extra)? = machine.helloReceived(on: 5, hello("w2")).first else { Issue.record("no refusal"); return }
        #expect(extra.message.contains("expects 2 workers"))
        // The two legitimate workers still run the job.
        _ = machine.announced(on: 1, layers: layers)
        #expect(machine.announced(on: 4, layers: layers).contains(.openLayer(0)))
    }

    @Test func aWorkerWithADifferentShapeIsRefusedByNameAndItsSlotFreed() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 2, mode: .dense))
        _ = machine.helloReceived(on: 1, hello("w0"))
        _ = machine.announced(on: 1, layers: layers)
        _ = machine.helloReceived(on: 2, hello("bad"))
        var wrong = layers
        wrong[1] = GradientLayer(name: "b.weight", rows: 6, cols: 7, dtype: "F32")
        let refusal = machine.announced(on: 2, layers: wrong)
        guard case .refuse(2, let error)? = refusal.first else { Issue.record("\(refusal)"); return }
        #expect(error.code == .shapeMismatch)
        #expect(error.message == "worker 'bad': layer 'b.weight' is 6×7, but 6×6 in worker 'w0'")
        let missing = Array(layers.dropLast())
        _ = machine.helloReceived(on: 3, hello("short"))
        guard case .refuse(3, let missingError)? = machine.announced(on: 3, layers: missing).first else { Issue.record("no refusal"); return }
        #expect(missingError.message.contains("no layer 'c.weight'"))
        // The slot is free again: a good worker completes the set.
        _ = machine.helloReceived(on: 4, hello("w1"))
        #expect(machine.announced(on: 4, layers: layers).contains(.openLayer(0)))
    }

    @Test func denseLayerRestartsForEveryoneWhenAWorkerDropsMidLayer() {
        var (machine, _) = running(.dense, window: 1)
        _ = machine.shardArrived(on: 1, layer: 0, attempt: 0)
        _ = machine.shardArrived(on: 2, layer: 0, attempt: 0)
        _ = machine.committed(on: 2, layer: 0, attempt: 0, verified: true)
        let actions = machine.connectionClosed(1)
        #expect(actions.contains(.startRejoinTimer(worker: "w0")))
        #expect(actions.contains(.restartLayer(0, attempt: 1)))
        #expect(begins(actions).map { [$0.0, Int($0.1), Int($0.2)] } == [[2, 0, 1]])
        // Late data of the old attempt is dropped; w1's old commit no longer counts.
        #expect(machine.shardArrived(on: 2, layer: 0, attempt: 0) == .ignore)
        #expect(machine.committed(on: 2, layer: 0, attempt: 0, verified: true) == [])
        // w0 rejoins on a new connection and is told to send the layer under the new attempt.
        #expect(machine.helloReceived(on: 3, hello("w0")) == [.sendJobSpec(3)])
        let replay = machine.announced(on: 3, layers: layers)
        #expect(begins(replay).map { [$0.0, Int($0.1), Int($0.2)] } == [[3, 0, 1]])
        _ = machine.committed(on: 2, layer: 0, attempt: 1, verified: true)
        #expect(machine.committed(on: 3, layer: 0, attempt: 1, verified: true) == [.finalizeLayer(0)])
    }

    @Test func sketchLayerAlsoRestartsButAWorkerThatSentNothingCostsNothing() {
        var (machine, _) = running(.sketch, window: 1)
        _ = machine.shardArrived(on: 2, layer: 0, attempt: 0)
        // w0 sent nothing for the layer: losing it restarts nothing.
        #expect(!machine.connectionClosed(1).contains { if case .restartLayer = $0 { return true } else { return false } })
        _ = machine.helloReceived(on: 3, hello("w0"))
        #expect(begins(machine.announced(on: 3, layers: layers)).map { [$0.0, Int($0.1), Int($0.2)] } == [[3, 0, 0]])
        // w1 had sent rows: losing it restarts the layer.
        #expect(machine.connectionClosed(2).contains(.restartLayer(0, attempt: 1)))
    }

    @Test func aWorkerThatDoesNotComeBackFailsTheJobByName() {
        var (machine, _) = running(.dense)
        _ = machine.connectionClosed(2)
        let actions = machine.rejoinTimedOut(worker: "w1", after: 120)
        #expect(actions.contains(.failJob("worker 'w1' left and did not come back within 120 s; no adapter is written from a partial sum")))
        #expect(actions.contains { if case .send(1, .error) = $0 { return true } else { return false } })
        // A worker that came back in time cancels nothing.
        var (other, _) = running(.dense)
        _ = other.connectionClosed(2)
        _ = other.helloReceived(on: 3, hello("w1"))
        _ = other.announced(on: 3, layers: layers)
        #expect(other.rejoinTimedOut(worker: "w1", after: 120) == [])
    }

    @Test func powerRoundsCountEachWorkerOnceAndResendToARejoiningWorker() {
        var (machine, opening) = running(.power, window: 1)
        #expect(opening.contains(.openLayer(0)))
        let request = PowerRequest(layerIndex: 0, round: 0, side: .range, matrixRows: 4, matrixCols: 2, values: [Float](repeating: 1, count: 8))
        let sent = machine.powerRequestReady(layer: 0, request)
        #expect(sent == [.send(1, .powerRequest(request)), .send(2, .powerRequest(request))])
        #expect(machine.powerReplyArrived(on: 1, layer: 0, round: 0) == .accept(worker: "w0"))
        #expect(machine.powerReplyStored(layer: 0, worker: "w0") == [])
        #expect(machine.powerReplyArrived(on: 1, layer: 0, round: 0) == .ignore)   // duplicate
        // w1 drops before answering and comes back: it gets the same request again.
        _ = machine.connectionClosed(2)
        _ = machine.helloReceived(on: 3, hello("w1"))
        let replay = machine.announced(on: 3, layers: layers)
        #expect(replay.contains(.send(3, .powerRequest(request))))
        #expect(machine.powerReplyArrived(on: 3, layer: 0, round: 0) == .accept(worker: "w1"))
        #expect(machine.powerReplyStored(layer: 0, worker: "w1") == [.powerRoundComplete(0)])
        #expect(machine.shardArrived(on: 1, layer: 0, attempt: 0) == .violation("Shard in a power-mode job"))
    }

    @Test func resumedJobSkipsFinishedLayersAndRefusesADifferentLayerSet() {
        var machine = JobStateMachine(configuration: .init(expectedWorkers: 1, mode: .dense, window: 2), layers: layers, finished: [0])
        _ = machine.helloReceived(on: 1, hello("w0"))
        let actions = machine.announced(on: 1, layers: layers)
        #expect(actions.contains(.openLayer(1)) && actions.contains(.openLayer(2)) && !actions.contains(.openLayer(0)))
        #expect(machine.finishedLayerNames == ["a.weight"])
        var other = JobStateMachine(configuration: .init(expectedWorkers: 1, mode: .dense), layers: layers)
        _ = other.helloReceived(on: 1, hello("w0"))
        guard case .refuse(1, let error)? = other.announced(on: 1, layers: [layers[0]]).first else { Issue.record("no refusal"); return }
        #expect(error.message.contains("the job's manifest"))
    }
}
