import LoRAGACore
import LoRAGADaemon
import LoRAGAFormats
import LoRAGAWire
import NIOCore
import Testing
@testable import LoRAGAWorker

/// The worker's decisions, driven by events alone: no sockets, no files, no clock (the test
/// passes the clock's readings in).
@Suite struct WorkerStateMachineTests {
    typealias Action = WorkerStateMachine.Action
    /// The one place the tests build a layer (its stored dtype plays no part here).
    static func layer(_ name: String, rows: Int, cols: Int) -> GradientLayer {
        GradientLayer(name: name, rows: rows, cols: cols, dtype: .f32)
    }
    let layers = [layer("a.weight", rows: 8, cols: 4), layer("b.weight", rows: 6, cols: 6)]
    let t0 = ContinuousClock.now
    let challenge = Challenge(nonce: Bytes32(Array(repeating: 7, count: 32))!)

    func machine(timeout: Duration = .seconds(30)) -> WorkerStateMachine {
        WorkerStateMachine(configuration: .init(workerID: "w0", coordinator: "127.0.0.1:9000", connectTimeout: timeout, sessionNonce: 42),
                           layers: layers)
    }

    func spec(_ mode: SVDMode) -> JobSpec {
        JobSpec(jobID: "job", mode: mode, rank: 4, sketchWidth: 16, seed: 1, powerIterations: 2, rowsPerShard: 0,
                payloadDType: .f32, compression: .uncompressed)
    }

    /// A machine that has connected, greeted and joined a `mode` job.
    func serving(_ mode: SVDMode) -> WorkerStateMachine {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.connected()
        _ = machine.received(.challenge(challenge))
        _ = machine.received(.jobSpec(spec(mode)))
        return machine
    }

    func failure(_ actions: [Action]) -> WorkerError? {
        guard case .fail(let error)? = actions.last else { return nil }
        return error
    }

    func request(layer: UInt32) -> PowerRequest {
        PowerRequest(layerIndex: layer, round: 0, side: .range, matrixRows: 4, matrixCols: 2, payload: ByteBuffer())
    }

    // MARK: - Handshake

    @Test func handshakeGoesChallengeHelloJobSpecAnnounceInOrder() {
        var machine = machine()
        #expect(machine.start(now: t0) == [.connect])
        #expect(machine.connected() == [])   // the coordinator speaks first
        #expect(machine.state == .awaitingChallenge)
        #expect(machine.received(.challenge(challenge)) == [.sendHello(challenge: challenge, sessionNonce: 42)])
        #expect(machine.state == .awaitingJobSpec)
        #expect(machine.received(.jobSpec(spec(.dense))) == [.sendAnnounce(spec(.dense))])
        #expect(machine.state == .serving(spec(.dense), layers: [:]))
    }

    @Test func aRefusalBeforeTheHandshakeIsFinalWithItsCodesKind() {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.connected()
        let error = failure(machine.received(.error(ErrorMessage(code: .badAuth, message: "requires TLS"))))
        #expect(error?.isFinal == true && error?.kind == .authentication)
        #expect(error?.message.contains("refused the connection: requires TLS") == true)
        // Nothing more happens once failed, not even a reconnect when the socket closes.
        #expect(machine.connectionClosed(now: t0) == [])
    }

    @Test func aPeerThatDoesNotOpenWithAChallengeIsNotACoordinator() {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.connected()
        let error = failure(machine.received(.goodbye(Goodbye(reason: "hi"))))
        #expect(error?.isFinal == true && error?.kind == .other)
        #expect(error?.message.contains("not a lora-ga coordinator") == true)
    }

    @Test(arguments: [
        (WireErrorCode.badAuth, JobError.Kind.authentication), (.shapeMismatch, .badInput), (.layerMismatch, .badInput),
        (.badData, .badInput), (.duplicateWorker, .usage), (.badVersion, .usage), (.internal, .other), (.jobFailed, .other),
    ])
    func aRefusalOfTheHelloIsFinalWithItsCodesKind(code: WireErrorCode, kind: JobError.Kind) {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.connected()
        _ = machine.received(.challenge(challenge))
        let error = failure(machine.received(.error(ErrorMessage(code: code, message: "no"))))
        #expect(error == WorkerError(message: "the coordinator refused worker 'w0': no", isFinal: true, kind: kind))
    }

    @Test func anythingButAJobSpecAfterTheHelloIsFinal() {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.connected()
        _ = machine.received(.challenge(challenge))
        #expect(failure(machine.received(.layerDone(LayerDone(layerIndex: 0))))?.message == "expected JobSpec, got \(WireMessageType.layerDone)")
    }

    // MARK: - Connecting and reconnecting

    @Test func connectFailuresBackOffFrom100msDoublingTo5sUntilTheDeadline() {
        var machine = machine(timeout: .seconds(30))
        _ = machine.start(now: t0)
        var delays: [Duration] = []
        var now = t0
        while case .retry(let delay, _)? = machine.connectFailed(.init("refused"), now: now).first {
            delays.append(delay)
            now += delay
        }
        #expect(delays.prefix(8) == [.milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800),
                                     .milliseconds(1600), .milliseconds(3200), .seconds(5), .seconds(5)])
        // Past the deadline: interrupted but resumable (exit 75), not a retry loop forever.
        guard case .failed(let error) = machine.state else { Issue.record("\(machine.state)"); return }
        #expect(error.kind == .interrupted && error.kind.exitCode == 75 && error.isFinal)
        #expect(now >= t0 + .seconds(30) && now < t0 + .seconds(36))
        #expect(error.message.contains("could not reach the coordinator at 127.0.0.1:9000 within"))
    }

    @Test func aConnectionResetsTheBackoffAndItsEndStartsANewDeadline() {
        var machine = machine(timeout: .seconds(10))
        _ = machine.start(now: t0)
        for second in 0..<4 { _ = machine.connectFailed(.init("refused"), now: t0 + .seconds(second)) }
        _ = machine.connected()
        _ = machine.received(.challenge(challenge))
        // The connection drops long after the first deadline: a new deadline counts from now.
        let dropped = t0 + .seconds(60)
        #expect(machine.connectionClosed(now: dropped) == [.reconnect(because: "connection to the coordinator lost")])
        #expect(machine.state == .connecting(attempt: 1, deadline: dropped + .seconds(10), delay: .milliseconds(100)))
        #expect(machine.connectFailed(.init("refused"), now: dropped + .seconds(9)).first == .retry(after: .milliseconds(100), because: "coordinator at 127.0.0.1:9000 not reachable (refused)"))
        #expect(failure(machine.connectFailed(.init("refused"), now: dropped + .seconds(10)))?.kind == .interrupted)
    }

    @Test func aDroppedConnectionWhileServingReconnectsAndTheHandshakeStartsOver() {
        var machine = serving(.dense)
        _ = machine.received(.layerBegin(LayerBegin(layerIndex: 0, name: "a.weight")))
        #expect(machine.connectionClosed(now: t0, failure: .init("connection reset by peer"))
                == [.reconnect(because: "connection to the coordinator failed (connection reset by peer)")])
        _ = machine.connected()
        #expect(machine.state == .awaitingChallenge)
        #expect(machine.received(.challenge(challenge)) == [.sendHello(challenge: challenge, sessionNonce: 42)])   // same session
    }

    @Test func goodbyeClosesTheConnectionThenReconnects() {
        var machine = serving(.sketch)
        #expect(machine.received(.goodbye(Goodbye(reason: "restarting"))) == [.closeConnection])
        #expect(machine.connectionClosed(now: t0) == [.reconnect(because: "the coordinator said goodbye (restarting)")])
    }

    @Test func aTLSFailureIsAFinalConfigurationError() {
        var connecting = machine()
        _ = connecting.start(now: t0)
        let error = failure(connecting.connectFailed(.init("certificate verify failed", isTLS: true), now: t0))
        #expect(error?.kind == .usage && error?.isFinal == true && error?.message.contains("--tls-ca") == true)
        // A TLS failure surfacing on the first read of an opened connection is final too.
        var opened = machine()
        _ = opened.start(now: t0)
        _ = opened.connected()
        #expect(failure(opened.connectionClosed(now: t0, failure: .init("handshake failed", isTLS: true)))?.kind == .usage)
    }

    @Test func cancellationStopsAndNeverRetries() {
        var machine = machine()
        _ = machine.start(now: t0)
        _ = machine.connectFailed(.init("refused"), now: t0)
        #expect(machine.cancelled() == [.stop])
        #expect(machine.state == .stopped)
        #expect(machine.connectFailed(.init("refused"), now: t0) == [])
        #expect(machine.connectionClosed(now: t0) == [])
        #expect(machine.cancelled() == [])
        var midLayer = serving(.dense)
        #expect(midLayer.cancelled() == [.stop])
        #expect(midLayer.received(.layerBegin(LayerBegin(layerIndex: 0, name: "a.weight"))) == [])
    }

    // MARK: - Serving

    @Test func denseAndSketchStreamEachBegunLayerThenReleaseIt() {
        for mode in [SVDMode.dense, .sketch] {
            var machine = serving(mode)
            let begin = LayerBegin(layerIndex: 1, name: "b.weight", attempt: 2)
            #expect(machine.received(.layerBegin(begin)) == [.streamLayer(begin, layers[1], spec(mode)), .releaseLayer(layers[1])])
            #expect(machine.received(.layerDone(LayerDone(layerIndex: 1))) == [.releaseLayer(layers[1])])
            #expect(machine.received(.layerDone(LayerDone(layerIndex: 1))) == [])   // already released
        }
    }

    @Test func powerKeepsTheLayerAndAnswersItsRequestsByIndex() {
        var machine = serving(.power)
        #expect(machine.received(.layerBegin(LayerBegin(layerIndex: 3, name: "a.weight"))) == [])
        #expect(machine.received(.powerRequest(request(layer: 3))) == [.answerPower(request(layer: 3), layers[0])])
        #expect(machine.received(.powerRequest(request(layer: 3))) == [.answerPower(request(layer: 3), layers[0])])
        #expect(machine.received(.layerDone(LayerDone(layerIndex: 3))) == [.releaseLayer(layers[0])])
    }

    @Test func aPowerRequestBeforeItsLayerBeginIsFinal() {
        var machine = serving(.power)
        let error = failure(machine.received(.powerRequest(request(layer: 5))))
        #expect(error == WorkerError(message: "power request for layer 5 before its LayerBegin", isFinal: true))
        #expect(machine.connectionClosed(now: t0) == [])   // no reconnect after a final error
    }

    @Test func aLayerTheFilesDoNotHoldIsFinal() {
        var machine = serving(.dense)
        let error = failure(machine.received(.layerBegin(LayerBegin(layerIndex: 0, name: "z.weight"))))
        #expect(error?.isFinal == true)
        #expect(error?.message == "the coordinator asked for layer 'z.weight', which this worker's files do not hold")
    }

    @Test func jobDoneFinishesWithTheAdapterPath() {
        var machine = serving(.dense)
        let done = JobDone(adapterPath: "/out/adapter_model.safetensors", layers: 2)
        #expect(machine.received(.jobDone(done)) == [.finish(done)])
        #expect(machine.state == .finished(adapterPath: "/out/adapter_model.safetensors"))
        #expect(machine.connectionClosed(now: t0) == [])
    }

    @Test func theCoordinatorsBadDataErrorReconnectsEveryOtherErrorIsFinal() {
        // badData: the coordinator refused something this worker sent (a damaged shard): resend.
        var machine = serving(.dense)
        #expect(machine.received(.error(ErrorMessage(code: .badData, message: "checksum"))) == [.closeConnection])
        #expect(machine.connectionClosed(now: t0) == [.reconnect(because: "connection to the coordinator failed (coordinator: checksum)")])
        for code in WireErrorCode.allCases where code != .badData {
            var machine = serving(.dense)
            let error = failure(machine.received(.error(ErrorMessage(code: code, message: "stop"))))
            #expect(error == WorkerError(message: "coordinator: stop", isFinal: true, kind: code.failureKind), "\(code)")
        }
    }

    @Test func unexpectedMessagesWhileServingAreFinal() {
        let unexpected: [WireMessage] = [
            .challenge(challenge), .jobSpec(spec(.dense)),
            .layerCommit(LayerCommit(layerIndex: 0, shardCount: 1, rowCount: 8, checksum: 0)),
        ]
        for message in unexpected {
            var machine = serving(.dense)
            #expect(failure(machine.received(message))?.message == "unexpected \(message.type) from the coordinator")
        }
    }

    @Test func badDataInTheWorkersFilesIsReportedThenFinal() {
        var machine = serving(.dense)
        _ = machine.received(.layerBegin(LayerBegin(layerIndex: 0, name: "a.weight")))
        let actions = machine.filesFailed("worker 'w0': NaN in a.weight row 3")
        #expect(actions.first == .sendError(ErrorMessage(code: .badData, message: "worker 'w0': NaN in a.weight row 3")))
        #expect(failure(actions) == WorkerError(message: "worker 'w0': NaN in a.weight row 3", isFinal: true, kind: .badInput))
        #expect(failure(actions)?.kind.exitCode == 3)
    }
}
