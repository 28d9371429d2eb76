// Over 400 lines on purpose: the executor of every JobStateMachine action in one actor (its
// state is the actor's); shard bytes are in CoordinatorEngine+Shards.swift, power rounds in
// CoordinatorEngine+Power.swift.

import Foundation
import Logging
import LoRAGACore
import LoRAGADaemon
import LoRAGAFormats
import LoRAGAWire
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// The coordinator's executor: carries out ``JobStateMachine`` actions and owns what the
/// machine must not — every open layer's numbers (``LayerWork``), the checkpoint store, the
/// connections' outboxes, clocks and timers. An actor pinned to a dedicated thread, so BLAS
/// never blocks Swift's cooperative pool or NIO's event loops; connection tasks await it,
/// which turns a slow fold into TCP backpressure. Shard bytes are assembled in
/// `CoordinatorEngine+Shards.swift`.
public actor CoordinatorEngine {
    private let computeLoop: any EventLoop
    public nonisolated var unownedExecutor: UnownedSerialExecutor { computeLoop.executor.asUnownedSerialExecutor() }

    let options: CoordinatorOptions
    let logger: Logger
    var machine: JobStateMachine
    private var store: CheckpointStore?
    /// Held for the engine's life: no second process writes this output directory.
    private let lock: OutputLock

    /// One connection's executor-side state.
    struct Connection {
        var outbox: AsyncStream<Outgoing>.Continuation
        var gate: HandshakeGate
        var challenge: Bytes32?
        /// When this connection last delivered data (for stall warnings).
        var lastHeard: ContinuousClock.Instant
        var stallWarned = false
    }
    private var connections: [JobStateMachine.ConnectionID: Connection] = [:]
    private var nextConnection = 0

    /// One open layer's numbers: its sum or sketch (dense, sketch) or range finder and this
    /// round's replies (power), and its timings. One value per open layer, dropped whole.
    struct LayerWork {
        var accumulator: LayerAccumulator?
        var finder: RangeFinder?
        /// This round's replies, summed in worker-id order as they arrive (power).
        var round: PowerRoundSum?
        let started: ContinuousClock.Instant
        var firstShard: ContinuousClock.Instant?
        var bytes = 0
    }
    var work: [Int: LayerWork] = [:]
    /// Dense sums of finished layers, kept for the next layers of the same size (at most the
    /// window's worth; emptied before a sum of another size is made, so never extra memory).
    var spareSums: [[Float]] = []
    /// Dense and sketch SVDs run on this one thread (BLAS never on the cooperative pool), at a
    /// lower priority than receiving (see `FinalizeJob.run`).
    private let finalizeThread = NIOThreadPool(numberOfThreads: 1)

    /// Per connection: the shard being received; `.some(nil)` drops the rest of a refused one.
    var incoming: [JobStateMachine.ConnectionID: IncomingShard?] = [:]
    /// Per connection: bytes of a slice that straddles two pieces.
    var staging: [JobStateMachine.ConnectionID: [UInt8]] = [:]
    /// Decoded floats of the shard slice being added.
    var scratch: [Float] = []
    let codec = ZstdCodec()

    var totalBytes = 0
    /// Since when some layer has been receiving, and the receiving time before that.
    var receivingSince: ContinuousClock.Instant?
    var receivingSeconds = 0.0
    private let started = ContinuousClock.now
    private var outcome: Result<CoordinatorSummary, JobError>?
    /// Deadlines and watchdogs; cancelled when the job ends so none fires on a stopped engine.
    private var timers: [Task<Void, Never>] = []
    private var waiters: [CheckedContinuation<CoordinatorSummary, Error>] = []

    public init(options: CoordinatorOptions, computeLoop: any EventLoop, logger: Logger) throws {
        let problems = options.settings.validationErrors()
        guard problems.isEmpty else { throw JobError(.usage, problems.joined(separator: "; ")) }
        guard options.expectedWorkers >= 1 else { throw JobError(.usage, "--workers must be at least 1") }
        // Before anything in the directory is read or written.
        lock = try OutputLock(directory: options.outputDirectory, purpose: "lora-ga-coord")
        self.options = options
        self.computeLoop = computeLoop
        self.logger = logger
        let configuration = JobStateMachine.Configuration(
            expectedWorkers: options.expectedWorkers, mode: options.settings.mode, window: options.window, payloadDType: options.payloadDType,
            allowUncovered: options.allowUncovered)
        // A job already in the output directory is resumed: its manifest fixes the layers.
        if !options.restart, let manifest = CheckpointStore.existingManifest(in: options.outputDirectory) {
            let store = try CheckpointStore(directory: options.outputDirectory, settings: options.settings, layers: manifest.layers)
            let finished = Set(manifest.layers.indices.filter { store.isFinished(manifest.layers[$0]) })
            self.store = store
            self.machine = JobStateMachine(configuration: configuration, layers: manifest.layers, finished: finished)
            logger.info("resuming the job in \(options.outputDirectory): \(finished.count)/\(manifest.layers.count) layers already finished")
            for dropped in store.droppedLayers { logger.warning("checkpoint of '\(dropped)' failed its checks; it will be recomputed") }
        } else {
            self.machine = JobStateMachine(configuration: configuration)
        }
        if options.secret == nil {
            logger.warning("no shared secret (--secret-file): any process that can reach the coordinator's address can join the job as a worker")
        }
        finalizeThread.start()
    }

    deinit {
        finalizeThread.shutdownGracefully { _ in }
    }

    /// Workers that have announced and are counted in the job (for progress and tests).
    public var joinedWorkers: [String] { machine.workerIDs }

    // MARK: - Connections

    /// A new connection: it is challenged first (the nonce feeds authentication). Its decoder
    /// takes only a small Hello until `gate` opens; the handshake must finish in time.
    public func connected(_ continuation: AsyncStream<Outgoing>.Continuation, gate: HandshakeGate = HandshakeGate()) -> JobStateMachine.ConnectionID {
        nextConnection += 1
        let id = nextConnection
        let pending = connections.keys.filter { !machine.isActive($0) }.count
        let nonce = Bytes32.random()
        connections[id] = Connection(outbox: continuation, gate: gate, challenge: nonce, lastHeard: .now)
        guard pending < options.maxPendingConnections else {
            logger.warning("refusing connection \(id): \(pending) connections are already in their handshake")
            refuse(id, ErrorMessage(code: .jobFailed, message: "too many connections in their handshake; try again later"))
            return id
        }
        continuation.yield(.message(.challenge(Challenge(nonce: nonce))))
        let timeout = options.handshakeTimeout
        timers.append(Task { [weak self] in
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            await self?.handshakeDeadline(id, timeout)
        })
        return id
    }

    private func handshakeDeadline(_ connection: JobStateMachine.ConnectionID, _ timeout: Duration) {
        guard connections[connection] != nil, !machine.isActive(connection) else { return }
        refuse(connection, ErrorMessage(code: .badData, message: "the handshake did not finish within \(timeout)"))
    }

    /// Connections not yet closed (workers hang up once they have read JobDone).
    public var openConnections: Int { connections.count }

    public func closed(_ connection: JobStateMachine.ConnectionID) {
        connections.removeValue(forKey: connection)?.outbox.finish()
        incoming[connection] = nil
        staging[connection] = nil
        if let worker = machine.worker(on: connection), outcome == nil, machine.isActive(connection) {
            logger.info("worker '\(worker)' disconnected")
        }
        perform(machine.connectionClosed(connection))
        options.metrics.workersConnected(connections.keys.filter { machine.isActive($0) }.count)
    }

    /// A connection's inbound stream failed to decode (garbage, oversize frame): drop it, job unharmed.
    public func protocolError(_ error: Error, on connection: JobStateMachine.ConnectionID) {
        logger.warning("connection \(connection)\(machine.worker(on: connection).map { " (worker '\($0)')" } ?? ""): \(error); dropping it")
        refuse(connection, ErrorMessage(code: .badData, message: "protocol error: \(error)"))
    }

    /// Rows of an uncompressed shard, as `StreamingFrameDecoder` passes them on.
    public func received(_ piece: ShardPiece, from connection: JobStateMachine.ConnectionID) {
        guard outcome == nil else { return }
        heard(connection)
        receivePiece(piece, from: connection)
    }

    public func received(_ message: WireMessage, from connection: JobStateMachine.ConnectionID) {
        guard outcome == nil else { return }
        heard(connection)
        switch message {
        case .hello(let hello):
            // Authenticate before anything else: an unauthenticated peer never reaches the job.
            if let secret = options.secret {
                guard let challenge = connections[connection]?.challenge, secret.verify(hello, challenge: challenge) else {
                    return refuse(connection, ErrorMessage(code: .badAuth, message: "authentication failed for worker '\(hello.workerID)': wrong or missing shared secret (--secret-file / LORA_GA_SECRET_FILE)"))
                }
            }
            connections[connection]?.challenge = nil
            perform(machine.helloReceived(on: connection, hello))
        case .announce(let announce):
            let layers = announce.layers.map { GradientLayer(name: $0.name, rows: Int($0.rows), cols: Int($0.cols), dtype: $0.sourceDType) }
            let regions = Dictionary(announce.layers.map { ($0.name, $0.regions) }, uniquingKeysWith: { first, _ in first })
            perform(machine.announced(on: connection, layers: layers, regions: regions))
            if let worker = machine.worker(on: connection), machine.isActive(connection) {
                logger.info("worker '\(worker)' joined with \(layers.count) layers (\(machine.workerIDs.count)/\(options.expectedWorkers) workers)")
                options.metrics.workersConnected(connections.keys.filter { machine.isActive($0) }.count)
            }
        case .shard(let shard):
            receiveShard(shard, from: connection)
        case .layerCommit(let commit):
            perform(machine.committed(on: connection, commit))
        case .powerReply(let reply):
            receivePowerReply(reply, from: connection)
        case .error(let error):
            if machine.worker(on: connection) != nil {
                perform(machine.workerReported(on: connection, error))
            } else {
                logger.warning("connection \(connection) reported: \(error.code): \(error.message)")
            }
        case .goodbye:
            break
        case .challenge, .jobSpec, .layerBegin, .layerDone, .powerRequest, .jobDone:
            refuse(connection, ErrorMessage(code: .badData, message: "\(message.type) is a coordinator-to-worker message"))
        }
    }

    func heard(_ connection: JobStateMachine.ConnectionID) {
        connections[connection]?.lastHeard = .now
        connections[connection]?.stallWarned = false
    }

    /// The worker a data message comes from, or nil once it has been dropped (stale, duplicate)
    /// or its connection refused (a protocol violation).
    func accepted(_ verdict: JobStateMachine.Verdict, on connection: JobStateMachine.ConnectionID) -> String? {
        switch verdict {
        case .accept(let worker):
            return worker
        case .ignore:
            return nil
        case .violation(let reason):
            refuse(connection, ErrorMessage(code: .badData, message: reason))
            return nil
        }
    }

    // MARK: - Actions

    func perform(_ actions: [JobStateMachine.Action]) {
        for action in actions {
            switch action {
            case .send(let connection, let message):
                connections[connection]?.outbox.yield(.message(message))
            case .refuse(let connection, let error):
                refuse(connection, error)
            case .sendJobSpec(let connection):
                connections[connection]?.gate.open()
                connections[connection]?.outbox.yield(.message(.jobSpec(jobSpec())))
            case .layersKnown(let layers):
                options.metrics.jobStarted(layers: layers.count, done: machine.finished.count)
                guard store == nil else { continue }   // a resumed job opened its store already
                do {
                    store = try CheckpointStore(directory: options.outputDirectory, settings: options.settings, layers: layers, restart: options.restart)
                    logger.info("job: \(layers.count) layers, rank \(options.settings.lora.rank), mode \(options.settings.mode.rawValue), \(options.expectedWorkers) workers")
                    // Which worker contributes which part of each layer, when some hold blocks.
                    let parts = machine.contributions()
                    if parts.contains(where: { $0.part != "whole" }) {
                        for part in parts { logger.info("layer '\(part.layer)': worker '\(part.worker)' holds \(part.part)") }
                    }
                    for (layer, hole) in machine.uncoveredParts() {
                        logger.warning("layer '\(layer)': no worker's blocks cover \(hole); counted as zeros (--allow-uncovered)")
                    }
                } catch {
                    perform(machine.fail(JobError(ExitStatus.kind(of: error), "\(error)")))
                }
            case .openLayer(let index, let layer):
                openLayer(index, layer)
            case .restartLayer(let index, let attempt):
                logger.warning("layer \(index): a worker left mid-layer; its rows are already folded in, so every worker resends the layer (attempt \(attempt))")
                work[index] = nil
                // A shard of the old attempt still arriving on another connection is dropped, or
                // its remaining rows would land in the new attempt's sum.
                for connection in incoming.keys where incoming[connection]??.layer == index {
                    incoming[connection] = .some(nil)
                }
                if let layer = machine.layers?[index] { openLayer(index, layer) }
            case .finalizeLayer(let index, let layer):
                finalizeInBackground(index, layer)
            case .powerRoundComplete(let index):
                completePowerRound(index)
            case .writeAdapter:
                writeAdapter()
            case .jobDone(let workers):
                jobDone(workers)
            case .failJob(let error):
                logger.error("job failed: \(error.message)")
                complete(.failure(error))
            case .startRejoinTimer(let worker):
                let timeout = options.rejoinTimeout
                logger.warning("worker '\(worker)' left mid-job; waiting up to \(timeout) for it to come back")
                timers.append(Task { [weak self] in
                    guard (try? await Task.sleep(for: timeout)) != nil else { return }
                    await self?.rejoinTimedOut(worker)
                })
            }
        }
    }

    private func rejoinTimedOut(_ worker: String) {
        perform(machine.rejoinTimedOut(worker: worker, after: Double(options.rejoinTimeout.components.seconds)))
    }

    /// Starts the gather deadline and the stall watchdog; call once when the server listens.
    public func startGatherTimer() {
        let timeout = options.gatherTimeout
        timers.append(Task { [weak self] in
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            await self?.gatherTimedOut(timeout)
        })
        let period = Swift.max(.milliseconds(100), options.stallWarning / 4)
        timers.append(Task { [weak self] in
            while (try? await Task.sleep(for: period)) != nil {
                guard let self, await self.checkStalls() else { return }
            }
        })
    }

    private func gatherTimedOut(_ timeout: Duration) {
        guard machine.phase == .gathering else { return }
        let joined = machine.workerIDs
        perform(machine.fail(JobError(.other, "only \(joined.count) of \(options.expectedWorkers) workers joined within \(timeout)\(joined.isEmpty ? "" : " (\(joined.joined(separator: ", ")))")")))
    }

    /// Names every worker silent for longer than `stallWarning` while it owes an open layer
    /// data, once per silence. Returns false once the job has ended.
    private func checkStalls() -> Bool {
        guard outcome == nil else { return false }
        let owed = machine.outstanding()
        let now = ContinuousClock.now
        for (id, connection) in connections where !connection.stallWarned {
            guard let worker = machine.worker(on: id), let items = owed[worker], now - connection.lastHeard >= options.stallWarning else { continue }
            connections[id]!.stallWarned = true
            logger.warning("worker '\(worker)' has sent nothing for \(Int((now - connection.lastHeard).seconds)) s; it still owes \(items.joined(separator: "; "))")
        }
        return true
    }

    func refuse(_ connection: JobStateMachine.ConnectionID, _ error: ErrorMessage) {
        if let worker = machine.worker(on: connection) {
            logger.warning("refusing worker '\(worker)': \(error.message)")
        } else {
            logger.warning("refusing connection \(connection): \(error.message)")
        }
        connections[connection]?.outbox.yield(.message(.error(error)))
        connections[connection]?.outbox.yield(.close)
    }

    private func jobSpec() -> JobSpec {
        let settings = options.settings
        let width = settings.mode == .sketch ? settings.sketchWidth : 2 * settings.lora.rank + settings.oversampling
        return JobSpec(
            jobID: options.outputDirectory, mode: settings.mode, rank: UInt32(settings.lora.rank),
            sketchWidth: UInt32(width), seed: settings.seed, powerIterations: UInt32(settings.passes), rowsPerShard: 0,
            payloadDType: options.payloadDType, compression: options.compressShards ? .zstdShuffled : .uncompressed,
            skipLayers: machine.finishedLayerNames)
    }

    // MARK: - Layers

    private func openLayer(_ index: Int, _ layer: GradientLayer) {
        work[index] = LayerWork(started: .now)
        guard options.settings.mode == .power else { return }   // dense, sketch: memory once the first shard comes
        do {
            var finder = try RangeFinder(rows: layer.rows, cols: layer.cols, parameters: options.settings.randomizedSVD, layerName: layer.name)
            let step = finder.start()
            work[index]!.finder = finder
            advancePower(index, step: step, round: 0)
        } catch {
            perform(machine.fail(JobError(ExitStatus.kind(of: error), "\(error)")))
        }
    }

    /// A dense or sketch layer every worker committed: its SVD runs on the finalize thread
    /// while this one keeps taking the next open layer's shards (the machine's window), so
    /// ingest does not stop for factorization. A committed layer is never restarted, and
    /// the result is dropped if the job ended meanwhile.
    private func finalizeInBackground(_ index: Int, _ layer: GradientLayer) {
        guard let accumulator = work[index]?.accumulator.take() else {
            return perform(machine.fail(JobError("layer '\(layer.name)': every worker committed, but no shard arrived")))
        }
        // Moved, not copied, into the job: the sum's memory must have one owner to be reused.
        let job = FinalizeJob(accumulator)
        let transferred = (work[index]!.firstShard ?? work[index]!.started).duration(to: .now).seconds
        work[index]!.firstShard = nil
        if !work.values.contains(where: { $0.firstShard != nil }), let since = receivingSince {
            receivingSeconds += seconds(since: since)
            receivingSince = nil
        }
        let settings = options.settings
        let thread = finalizeThread
        Task {
            let started = ContinuousClock.now
            let result: FinalizeJob.Outcome
            do {
                result = try await thread.runIfActive { job.run(settings: settings) }
            } catch {
                result = .failure(error)  // the thread was stopped: the engine is going away
            }
            if let spare = job.takeSpare(), self.spareSums.count < self.options.window {
                self.spareSums.append(spare)
            }
            guard self.outcome == nil else { return }
            switch result {
            case .success(let (factors, svd, fidelity)):
                self.record(index, factors: factors, svd: svd, fidelity: fidelity, transferred: transferred, computed: self.seconds(since: started))
            case .failure(let error):
                self.perform(self.machine.fail(JobError(ExitStatus.kind(of: error), "layer '\(job.name)': \(error)")))
            }
        }
    }

    /// Checkpoints a finished layer, logs it, and tells the state machine.
    func record(_ index: Int, factors: LoRAFactors, svd: TruncatedSVD, fidelity: Double?, transferred: Double, computed: Double) {
        guard let layer = machine.layers?[index], let store else { return }
        let settings = options.settings
        let bytes = work[index]?.bytes ?? 0
        let report = LayerReport(name: layer.name, outFeatures: layer.rows, inFeatures: layer.cols, mode: settings.mode,
                                 singularValues: svd.s.map(Double.init), fidelityEstimate: fidelity, seconds: transferred + computed, bytesIn: bytes)
        do {
            try store.record(layer: layer, factors: factors, svd: svd, report: report)
        } catch {
            return perform(machine.fail(JobError(ExitStatus.kind(of: error), "layer '\(layer.name)': \(error)")))
        }
        let done = machine.finished.count + 1
        // In power mode the time before finalizing is rounds of worker compute, not transfer.
        let timing = settings.mode == .power
            ? String(format: "%d power passes %.2f s, factors %.2f s", settings.passes, transferred, computed)
            : String(format: "transfer %.2f s (%.0f MB/s), factors %.2f s", transferred, Double(bytes) / 1e6 / max(transferred, 1e-9), computed)
        let eta = options.metrics.layerDone(seconds: transferred + computed)
        logger.info("[\(done)/\(machine.layers!.count)] \(LocalJob.describe(report).replacingOccurrences(of: "read", with: "received")); \(timing); \(eta)")
        work[index] = nil
        perform(machine.layerFinalized(index))
    }

    func seconds(since start: ContinuousClock.Instant) -> Double {
        (ContinuousClock.now - start).seconds
    }

    /// Every layer is durable: assemble the adapter. Its failure fails the job like any other.
    private func writeAdapter() {
        do {
            guard let store else { throw JobError("no checkpoint store") }
            try store.writeAdapter(dtype: options.adapterDType, extraReport: ["workers": "\(options.expectedWorkers)"])
        } catch {
            return perform(machine.fail(JobError("writing the adapter to \(options.outputDirectory): \(error)")))
        }
        perform(machine.adapterWritten())
    }

    private func jobDone(_ workers: [JobStateMachine.ConnectionID]) {
        let layers = machine.layers?.count ?? 0
        let path = (options.outputDirectory as NSString).appendingPathComponent(PEFTAdapter.weightsFileName)
        for connection in workers {
            connections[connection]?.outbox.yield(.message(.jobDone(JobDone(adapterPath: path, layers: UInt32(layers)))))
        }
        for connection in connections.values { connection.outbox.yield(.close) }
        let summary = CoordinatorSummary(
            layers: layers, bytesReceived: totalBytes, seconds: seconds(since: started),
            receivingSeconds: options.settings.mode == .power ? nil : receivingSeconds,
            worstFidelityEstimate: store?.finishedReports.compactMap(\.fidelityEstimate).max(),
            adapterDirectory: options.outputDirectory)
        complete(.success(summary))
    }

    private func complete(_ result: Result<CoordinatorSummary, JobError>) {
        guard outcome == nil else { return }
        outcome = result
        for timer in timers { timer.cancel() }
        timers = []
        if case .failure = result {
            for connection in connections.values { connection.outbox.yield(.close) }
        }
        for waiter in waiters { waiter.resume(with: result.mapError { $0 as Error }) }
        waiters = []
    }

    /// A signal asked the coordinator to stop: workers are told to wait for its return, and
    /// the job ends unfinished. Every finished layer is already durable, so a restart resumes.
    public func shutdown(reason: String) {
        guard outcome == nil else { return }
        logger.warning("\(reason): stopping; finished layers are checkpointed in \(options.outputDirectory) and a restart resumes")
        for connection in connections.values {
            connection.outbox.yield(.message(.goodbye(Goodbye(reason: "coordinator stopping (\(reason)); it resumes when restarted"))))
        }
        complete(.failure(JobError(.interrupted, "stopped by \(reason) before the job finished; restart with the same --out to resume")))
    }

    /// Returns when the job has finished (adapter written) or failed.
    public func result() async throws -> CoordinatorSummary {
        if let outcome { return try outcome.get() }
        return try await withCheckedThrowingContinuation { waiters.append($0) }
    }
}
