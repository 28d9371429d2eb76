import Foundation
import Logging
import LoRAGADaemon
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// How a coordinator runs a job.
public struct CoordinatorOptions: Sendable {
    public var settings: JobSettings
    public var expectedWorkers: Int
    public var outputDirectory: String
    /// Layers open at once.
    public var window: Int = 2
    /// dtype shards travel in.
    public var payloadDType: TensorDType = .f32
    /// zstd over byte-shuffled shards (pays off on slow networks, not on loopback).
    public var compressShards = false
    public var adapterDType: TensorDType = .f32
    /// How long to wait for all workers to announce before giving up.
    public var gatherTimeout: Duration = .seconds(600)
    /// How long a worker that left mid-job may take to come back.
    public var rejoinTimeout: Duration = .seconds(120)
    /// Discard an existing job in the output directory.
    public var restart = false
    /// When set, every worker must prove it knows this secret before it can send anything.
    public var secret: JobSecret?
    /// Prometheus metrics and the progress estimate of the per-layer log lines.
    public var metrics = CoordinatorMetrics()

    public init(settings: JobSettings, expectedWorkers: Int, outputDirectory: String) {
        self.settings = settings
        self.expectedWorkers = expectedWorkers
        self.outputDirectory = outputDirectory
    }
}

/// What a finished job reports.
public struct CoordinatorSummary: Sendable {
    public var layers: Int
    public var bytesReceived: Int
    public var seconds: Double
    /// Dense and sketch: time during which some layer's shards were arriving (the union over
    /// layers, from a layer's first shard to its last commit), the denominator of ingest.
    public var receivingSeconds: Double?
    public var worstFidelityEstimate: Double?
    public var adapterDirectory: String
}

/// Messages for one connection's writer: a frame to send, or "finish and close".
public enum Outgoing: Sendable {
    case message(WireMessage)
    case close
}

/// The coordinator's brain: executes `JobStateMachine` actions and owns every layer's
/// numbers (sums, sketches, range finders) and the checkpoint store. An actor pinned to a
/// dedicated thread, so BLAS never blocks Swift's cooperative pool or NIO's event loops;
/// connection tasks await it, which is what turns a slow fold into TCP backpressure.
public actor CoordinatorEngine {
    private let computeLoop: any EventLoop
    public nonisolated var unownedExecutor: UnownedSerialExecutor { computeLoop.executor.asUnownedSerialExecutor() }

    let options: CoordinatorOptions
    let logger: Logger
    private var machine: JobStateMachine
    private var store: CheckpointStore?
    private var outbound: [JobStateMachine.ConnectionID: AsyncStream<Outgoing>.Continuation] = [:]
    private var challenges: [JobStateMachine.ConnectionID: Bytes32] = [:]
    private var nextConnection = 0

    private struct Progress {
        var nextRow = 0
        var shards: UInt32 = 0
        var checksum = ShardChecksum()
    }

    /// A shard whose rows are arriving on a connection, piece by piece.
    private struct IncomingShard {
        let layer: Int
        let worker: String
        let rowStart: Int
        let rows: Int
        let cols: Int
        let dtype: TensorDType
        /// Rows added at a time: ~256 KB for a dense sum, the whole shard for a sketch.
        let sliceRows: Int
        /// The worker's progress on the layer, stored back when the last piece is in.
        var progress: Progress
        /// The shard's declared checksum, counted into the commit's once the shard is in.
        let checksum: UInt64
        /// Rows of the shard already added, and bytes of the next slice staged so far.
        var rowsDone = 0
        var staged = 0
        var sliceBytes: Int { Swift.min(sliceRows, rows - rowsDone) * cols * dtype.byteSize }
    }
    /// Per connection: the shard being received; `.some(nil)` drops the rest of a refused one.
    private var incoming: [JobStateMachine.ConnectionID: IncomingShard?] = [:]
    /// Per connection: bytes of a slice that straddles two pieces.
    private var staging: [JobStateMachine.ConnectionID: [UInt8]] = [:]

    // Per open layer.
    private var accumulators: [Int: LayerAccumulator] = [:]
    /// Dense sums of finished layers, kept for the next layers of the same size (at most the
    /// window's worth; emptied before a sum of another size is made, so never extra memory).
    private var spareSums: [[Float]] = []
    /// Dense and sketch SVDs run on this one thread (BLAS never on the cooperative pool), at a
    /// lower priority than receiving (see `FinalizeJob.run`).
    private let finalizeThread = NIOThreadPool(numberOfThreads: 1)
    private var progress: [Int: [String: Progress]] = [:]
    private var finders: [Int: RangeFinder] = [:]
    private var powerReplies: [Int: [String: Matrix]] = [:]
    private var layerStarted: [Int: ContinuousClock.Instant] = [:]
    private var layerBytes: [Int: Int] = [:]
    private var firstShard: [Int: ContinuousClock.Instant] = [:]
    /// Since when some layer has been receiving, and the receiving time before that.
    private var receivingSince: ContinuousClock.Instant?
    private var receivingSeconds = 0.0

    /// Decoded floats of the shard slice being added.
    private var scratch: [Float] = []
    /// Slice of a shard added to a dense sum at a time: fits in L2 with room for the sum's rows.
    private static let denseSliceBytes = 256 << 10
    private let codec = ZstdCodec()
    private var totalBytes = 0
    private let started = ContinuousClock.now
    private var outcome: Result<CoordinatorSummary, JobError>?
    /// The kind of the failure about to be reported (decides the exit status), set where it is detected.
    private var failureKind: JobError.Kind = .other
    /// Gather and rejoin deadlines; cancelled when the job ends so none fires on a stopped engine.
    private var timers: [Task<Void, Never>] = []
    private var waiters: [CheckedContinuation<CoordinatorSummary, Error>] = []

    public init(options: CoordinatorOptions, computeLoop: any EventLoop, logger: Logger) throws {
        let problems = options.settings.validationErrors()
        guard problems.isEmpty else { throw JobError(.usage, problems.joined(separator: "; ")) }
        guard options.expectedWorkers >= 1 else { throw JobError(.usage, "--workers must be at least 1") }
        self.options = options
        self.computeLoop = computeLoop
        self.logger = logger
        finalizeThread.start()
        let configuration = JobStateMachine.Configuration(expectedWorkers: options.expectedWorkers, mode: options.settings.mode, window: options.window)
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
    }

    deinit {
        finalizeThread.shutdownGracefully { _ in }
    }

    /// Workers that have announced and are counted in the job (for progress and tests).
    public var joinedWorkers: [String] { machine.workerIDs }

    // MARK: - Connections

    /// A new connection: it is challenged first (the nonce feeds authentication).
    public func connected(_ continuation: AsyncStream<Outgoing>.Continuation) -> JobStateMachine.ConnectionID {
        nextConnection += 1
        outbound[nextConnection] = continuation
        let nonce = Bytes32.random()
        challenges[nextConnection] = nonce
        continuation.yield(.message(.challenge(Challenge(nonce: nonce))))
        return nextConnection
    }

    /// Connections not yet closed (workers hang up once they have read JobDone).
    public var openConnections: Int { outbound.count }

    public func closed(_ connection: JobStateMachine.ConnectionID) {
        outbound.removeValue(forKey: connection)?.finish()
        challenges[connection] = nil
        incoming[connection] = nil
        staging[connection] = nil
        if let worker = machine.worker(on: connection), outcome == nil {
            logger.info("worker '\(worker)' disconnected")
        }
        perform(machine.connectionClosed(connection))
        options.metrics.workersConnected(outbound.keys.filter { machine.worker(on: $0) != nil }.count)
    }

    /// A connection's inbound stream failed to decode (garbage, oversize frame): drop it, job unharmed.
    public func protocolError(_ error: Error, on connection: JobStateMachine.ConnectionID) {
        logger.warning("connection \(connection)\(machine.worker(on: connection).map { " (worker '\($0)')" } ?? ""): \(error); dropping it")
        refuse(connection, ErrorMessage(code: .badData, message: "protocol error: \(error)"))
    }

    /// Rows of an uncompressed shard, as `StreamingFrameDecoder` passes them on.
    public func received(_ piece: ShardPiece, from connection: JobStateMachine.ConnectionID) {
        guard outcome == nil else { return }
        receivePiece(piece, from: connection)
    }

    public func received(_ message: WireMessage, from connection: JobStateMachine.ConnectionID) {
        guard outcome == nil else { return }
        switch message {
        case .hello(let hello):
            // Authenticate before anything else: an unauthenticated peer never reaches the job.
            if let secret = options.secret {
                guard let challenge = challenges.removeValue(forKey: connection), secret.verify(hello, challenge: challenge) else {
                    return refuse(connection, ErrorMessage(code: .badAuth, message: "authentication failed for worker '\(hello.workerID)': wrong or missing shared secret (--secret-file / LORA_GA_SECRET_FILE)"))
                }
            }
            perform(machine.helloReceived(on: connection, hello))
        case .announce(let announce):
            let layers = announce.layers.map { GradientLayer(name: $0.name, rows: Int($0.rows), cols: Int($0.cols), dtype: TensorDType(wire: $0.sourceDType).rawValue) }
            perform(machine.announced(on: connection, layers: layers))
            if let worker = machine.worker(on: connection) {
                logger.info("worker '\(worker)' joined with \(layers.count) layers (\(machine.workerIDs.count)/\(options.expectedWorkers) workers)")
                options.metrics.workersConnected(outbound.keys.filter { machine.worker(on: $0) != nil }.count)
            }
        case .shard(let shard):
            receiveShard(shard, from: connection)
        case .layerCommit(let commit):
            receiveCommit(commit, from: connection)
        case .powerReply(let reply):
            receivePowerReply(reply, from: connection)
        case .error(let error):
            // A worker that found its own data unusable ends the job: no correct adapter can follow.
            if machine.worker(on: connection) != nil {
                failureKind = error.code == .badData ? .badInput : .other
                perform(machine.fail(error.message))
            } else {
                logger.warning("connection \(connection) reported: \(error.code): \(error.message)")
            }
        case .goodbye:
            break
        case .challenge, .jobSpec, .layerBegin, .layerDone, .powerRequest, .jobDone:
            refuse(connection, ErrorMessage(code: .badData, message: "\(message.type) is a coordinator-to-worker message"))
        }
    }

    // MARK: - Data

    /// A shard that came whole (compressed, or from a decoder that assembles frames): its
    /// uncompressed rows as one piece.
    private func receiveShard(_ shard: Shard, from connection: JobStateMachine.ConnectionID) {
        var fields = shard
        fields.payload = ByteBuffer()
        guard shard.compression == .zstdShuffled else {
            return receivePiece(ShardPiece(shard: fields, offset: 0, bytes: shard.payload, checksumMatches: shard.payloadMatchesChecksum), from: connection)
        }
        // Shape and dtype are checked against the job before decompression allocates.
        guard let started = startShard(fields, from: connection) else { return }
        incoming[connection] = .some(started)
        let bytes: ByteBuffer
        do {
            let dtypeBytes = TensorDType(wire: shard.dtype).byteSize
            let shuffled = try shard.payload.withUnsafeReadableBytes { try codec.decompress($0, expectedSize: Int(shard.uncompressedBytes)) }
            bytes = ByteBuffer(bytes: shuffled.withUnsafeBytes { ByteShuffle.unshuffle($0, elementSize: dtypeBytes) })
        } catch {
            return refuse(connection, ErrorMessage(code: .badData, message: "layer \(shard.layerIndex): \(error)"))
        }
        addRows(bytes, checksumMatches: shard.payloadMatchesChecksum, from: connection, wireBytes: shard.payload.readableBytes)
    }

    /// Rows of a shard as they arrive. The first piece is checked against the job (layer,
    /// attempt, shape, row order, dtype); each slice of rows is decoded, checked for NaN/Inf
    /// and added once all of its bytes are in; the last piece brings the checksum's verdict
    /// and records the worker's progress, which its commit must match.
    private func receivePiece(_ piece: ShardPiece, from connection: JobStateMachine.ConnectionID) {
        if piece.isFirst {
            incoming[connection] = .some(startShard(piece.shard, from: connection))
        }
        addRows(piece.bytes, checksumMatches: piece.isLast ? piece.checksumMatches ?? false : nil, from: connection, wireBytes: piece.bytes.readableBytes)
    }

    /// The next bytes of the shard being received on `connection` (`wireBytes` of them counted
    /// as received: compressed shards arrived smaller than their rows). `checksumMatches` is
    /// nil until the shard's last bytes, which come with the checksum's verdict.
    private func addRows(_ received: ByteBuffer, checksumMatches: Bool?, from connection: JobStateMachine.ConnectionID, wireBytes: Int) {
        guard var shard = incoming[connection] ?? nil else { return }   // refused, or never begun
        var bytes = received
        while bytes.readableBytes > 0 {
            let need = shard.sliceBytes - shard.staged
            if shard.staged == 0 && bytes.readableBytes >= need {
                // The whole slice is in this piece: add it from the received bytes.
                let slice = bytes.readSlice(length: need)!
                guard slice.withUnsafeReadableBytes({ addSlice($0, of: &shard) }) else { return }
                continue
            }
            // Taken out of the dictionary while written, so it is not copied on write.
            var buffer = staging.removeValue(forKey: connection) ?? []
            if buffer.count < shard.sliceRows * shard.cols * shard.dtype.byteSize {
                buffer = [UInt8](repeating: 0, count: shard.sliceRows * shard.cols * shard.dtype.byteSize)
            }
            let count = Swift.min(need, bytes.readableBytes)
            buffer.withUnsafeMutableBytes { target in
                _ = bytes.readWithUnsafeReadableBytes { source in
                    target.baseAddress!.advanced(by: shard.staged).copyMemory(from: source.baseAddress!, byteCount: count)
                    return count
                }
            }
            shard.staged += count
            if count == need {
                let sliceBytes = shard.staged
                let added = buffer.withUnsafeBytes { addSlice(UnsafeRawBufferPointer(rebasing: $0[0..<sliceBytes]), of: &shard) }
                shard.staged = 0
                staging[connection] = buffer
                guard added else { return }
            } else {
                staging[connection] = buffer
            }
        }
        if let checksumMatches {
            assert(shard.rowsDone == shard.rows, "a shard's pieces add up to its rows (the decoder checks the frame length)")
            guard checksumMatches else {
                let layer = machine.layers![shard.layer]
                // Its rows are in the sum already: refusing the connection discards the
                // worker's uncommitted rows of the layer, as a bad commit does.
                return refuse(connection, ErrorMessage(code: .badData, message: "layer '\(layer.name)': shard rows \(shard.rowStart)..<\(shard.rowStart + shard.rows) do not match their checksum; reconnect to resend"))
            }
            shard.progress.checksum.addShard(shard.checksum)
            shard.progress.nextRow += shard.rows
            shard.progress.shards += 1
            progress[shard.layer, default: [:]][shard.worker] = shard.progress
            incoming[connection] = nil
        } else {
            incoming[connection] = .some(shard)
        }
        layerBytes[shard.layer, default: 0] += wireBytes
        totalBytes += wireBytes
        options.metrics.received(bytes: wireBytes)
    }

    /// Checks a shard's fields against the job and readies its layer's sum; nil when refused.
    private func startShard(_ shard: Shard, from connection: JobStateMachine.ConnectionID) -> IncomingShard? {
        let index = Int(shard.layerIndex)
        guard let worker = accepted(machine.shardArrived(on: connection, layer: index, attempt: shard.attempt), on: connection) else { return nil }
        let layer = machine.layers![index]
        let state = progress[index]?[worker] ?? Progress()
        let dtype = TensorDType(wire: shard.dtype)
        guard shard.cols == UInt64(layer.cols) else {
            refuse(connection, ErrorMessage(code: .shapeMismatch, message: "layer '\(layer.name)' has \(layer.cols) columns, shard has \(shard.cols)"))
            return nil
        }
        guard shard.rowStart == UInt64(state.nextRow), shard.rowEnd <= UInt64(layer.rows) else {
            refuse(connection, ErrorMessage(code: .badData, message: "layer '\(layer.name)': shard rows \(shard.rowStart)..<\(shard.rowEnd), expected rows from \(state.nextRow) within \(layer.rows)"))
            return nil
        }
        guard dtype == options.payloadDType else {
            refuse(connection, ErrorMessage(code: .badData, message: "shard dtype \(dtype), the job sends \(options.payloadDType)"))
            return nil
        }
        if firstShard[index] == nil {
            firstShard[index] = .now
            if receivingSince == nil { receivingSince = .now }
        }
        if accumulators[index] == nil {
            // Taken at the first shard, not when the layer opens: memory only once data comes,
            // and the time to map a large sum counts as receiving time.
            do {
                let size = layer.rows * layer.cols
                let reusable = spareSums.firstIndex { $0.count == size }
                if reusable == nil { spareSums.removeAll() }
                accumulators[index] = try LayerAccumulator(name: layer.name, rows: layer.rows, cols: layer.cols, settings: options.settings,
                                                           reusing: reusable.map { spareSums.remove(at: $0) })
            } catch {
                perform(machine.fail("\(error)"))
                return nil
            }
        }
        let rows = Int(shard.rowCount)
        // A dense sum takes a shard in slices of ~256 KB: decoded, checked and added
        // while the slice is in cache. A sketch multiplies whole shards (its GEMM wants them).
        let sliceRows = accumulators[index]!.isDense ? Swift.max(1, Swift.min(rows, Self.denseSliceBytes / (4 * layer.cols))) : rows
        return IncomingShard(layer: index, worker: worker, rowStart: Int(shard.rowStart), rows: rows, cols: layer.cols,
                             dtype: dtype, sliceRows: sliceRows, progress: state, checksum: shard.checksum)
    }

    /// Decodes, checks and adds the next slice of rows; false when it held a NaN or
    /// Inf, which fails the job (so slices added before it do not matter).
    private func addSlice(_ raw: UnsafeRawBufferPointer, of shard: inout IncomingShard) -> Bool {
        let rows = raw.count / (shard.cols * shard.dtype.byteSize)
        let firstRow = shard.rowStart + shard.rowsDone
        let dense = accumulators[shard.layer]!.isDense
        let bad = withFloats(raw, as: shard.dtype, unaligned: dense) { floats -> Int? in
            if dense {
                // Checked and summed in one pass (straight from the frame for F32).
                return accumulators[shard.layer]!.addDenseFloat32(rowStart: firstRow, bytes: floats)
            }
            let block = RowBlock(rowStart: firstRow, rowCount: rows, cols: shard.cols, values: floats.assumingMemoryBound(to: Float.self))
            if let offset = block.firstNonFiniteIndex() { return offset }
            accumulators[shard.layer]!.add(block)
            return nil
        }
        if let bad {
            let layer = machine.layers![shard.layer]
            failureKind = .badInput
            perform(machine.fail("worker '\(shard.worker)': layer '\(layer.name)' has a NaN or Inf value in row \(firstRow + bad / shard.cols)"))
            return false
        }
        shard.rowsDone += rows
        return true
    }

    /// The slice's values as native Float bytes: decoded into `scratch`, or, for F32 when the
    /// body reads them `unaligned` (the dense sum does), the received bytes themselves (wire
    /// floats are little-endian).
    private func withFloats<T>(_ raw: UnsafeRawBufferPointer, as dtype: TensorDType, unaligned: Bool, _ body: (UnsafeRawBufferPointer) -> T) -> T {
        #if _endian(little)
        if dtype == .f32 && unaligned { return body(raw) }
        #endif
        let count = raw.count / dtype.byteSize
        if scratch.count < count { scratch = [Float](repeating: 0, count: count) }
        return scratch.withUnsafeMutableBufferPointer { floats in
            let values = UnsafeMutableBufferPointer(rebasing: floats[0..<count])
            FloatCodec.decode(raw, as: dtype, into: values)
            return body(UnsafeRawBufferPointer(values))
        }
    }

    private func receiveCommit(_ commit: LayerCommit, from connection: JobStateMachine.ConnectionID) {
        let index = Int(commit.layerIndex)
        guard let worker = machine.worker(on: connection), let layers = machine.layers, index < layers.count else {
            return perform(machine.committed(on: connection, layer: index, attempt: commit.attempt, verified: false))
        }
        let state = progress[index]?[worker] ?? Progress()
        let verified = state.nextRow == layers[index].rows && commit.rowCount == UInt64(state.nextRow)
            && commit.shardCount == state.shards && commit.checksum == state.checksum.value
        perform(machine.committed(on: connection, layer: index, attempt: commit.attempt, verified: verified))
    }

    private func receivePowerReply(_ reply: PowerReply, from connection: JobStateMachine.ConnectionID) {
        let index = Int(reply.layerIndex)
        guard let worker = accepted(machine.powerReplyArrived(on: connection, layer: index, round: reply.round), on: connection) else { return }
        let layer = machine.layers![index]
        let finder = finders[index]!
        let expectedRows = reply.side == .range ? layer.rows : layer.cols
        guard Int(reply.matrixRows) == expectedRows, Int(reply.matrixCols) == finder.sketchWidth else {
            return refuse(connection, ErrorMessage(code: .shapeMismatch, message: "layer '\(layer.name)': reply is \(reply.matrixRows)×\(reply.matrixCols), expected \(expectedRows)×\(finder.sketchWidth)"))
        }
        let values = reply.values
        if let bad = values.firstIndex(where: { !$0.isFinite }) {
            failureKind = .badInput
            return perform(machine.fail("worker '\(worker)': layer '\(layer.name)' produced NaN/Inf in its power-iteration product (row \(bad / finder.sketchWidth)); its gradient contains non-finite values"))
        }
        powerReplies[index, default: [:]][worker] = Matrix(rows: expectedRows, cols: finder.sketchWidth, storage: values)
        layerBytes[index, default: 0] += reply.payload.readableBytes
        totalBytes += reply.payload.readableBytes
        options.metrics.received(bytes: reply.payload.readableBytes)
        perform(machine.powerReplyStored(layer: index, worker: worker))
    }

    /// The worker a data message comes from, or nil once it has been dropped (stale, duplicate)
    /// or its connection refused (a protocol violation).
    private func accepted(_ verdict: JobStateMachine.Verdict, on connection: JobStateMachine.ConnectionID) -> String? {
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

    private func perform(_ actions: [JobStateMachine.Action]) {
        for action in actions {
            switch action {
            case .send(let connection, let message):
                outbound[connection]?.yield(.message(message))
            case .refuse(let connection, let error):
                refuse(connection, error)
            case .sendJobSpec(let connection):
                outbound[connection]?.yield(.message(.jobSpec(jobSpec())))
            case .layersKnown(let layers):
                do {
                    store = try CheckpointStore(directory: options.outputDirectory, settings: options.settings, layers: layers, restart: options.restart)
                    options.metrics.jobStarted(layers: layers.count, done: machine.finished.count)
                    logger.info("job: \(layers.count) layers, rank \(options.settings.lora.rank), mode \(options.settings.mode.rawValue), \(options.expectedWorkers) workers")
                } catch {
                    perform(machine.fail("\(error)"))
                }
            case .openLayer(let index):
                openLayer(index)
            case .restartLayer(let index, let attempt):
                logger.warning("layer \(index): a worker left mid-layer; its rows are already folded in, so every worker resends the layer (attempt \(attempt))")
                progress[index] = [:]
                layerBytes[index] = 0
                accumulators[index] = nil
                // A shard of the old attempt still arriving on another connection is dropped, or
                // its remaining rows would land in the new attempt's sum.
                for connection in incoming.keys where incoming[connection]??.layer == index {
                    incoming[connection] = .some(nil)
                }
                openLayer(index)
            case .finalizeLayer(let index):
                finalizeInBackground(index)
            case .powerRoundComplete(let index):
                completePowerRound(index)
            case .finishJob:
                finishJob()
            case .failJob(let reason):
                logger.error("job failed: \(reason)")
                complete(.failure(JobError(failureKind, reason)))
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

    /// Starts the gather deadline; call once when the server listens.
    public func startGatherTimer() {
        let timeout = options.gatherTimeout
        timers.append(Task { [weak self] in
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            await self?.gatherTimedOut(timeout)
        })
    }

    private func gatherTimedOut(_ timeout: Duration) {
        guard machine.phase == .gathering else { return }
        perform(machine.fail("only \(machine.workerIDs.count) of \(options.expectedWorkers) workers joined within \(timeout) (\(machine.workerIDs.joined(separator: ", ")))"))
    }

    private func refuse(_ connection: JobStateMachine.ConnectionID, _ error: ErrorMessage) {
        if let worker = machine.worker(on: connection) {
            logger.warning("refusing worker '\(worker)': \(error.message)")
        } else {
            logger.warning("refusing connection \(connection): \(error.message)")
        }
        outbound[connection]?.yield(.message(.error(error)))
        outbound[connection]?.yield(.close)
    }

    private func jobSpec() -> JobSpec {
        let settings = options.settings
        let width = settings.mode == .sketch ? settings.sketchWidth : 2 * settings.lora.rank + settings.oversampling
        return JobSpec(
            jobID: options.outputDirectory, mode: WireJobMode(settings.mode), rank: UInt32(settings.lora.rank),
            sketchWidth: UInt32(width), seed: settings.seed, powerIterations: UInt32(settings.passes), rowsPerShard: 0,
            payloadDType: WireDType(options.payloadDType), compression: options.compressShards ? .zstdShuffled : .uncompressed,
            skipLayers: machine.finishedLayerNames)
    }

    private func openLayer(_ index: Int) {
        let layer = machine.layers![index]
        layerStarted[index] = layerStarted[index] ?? .now
        do {
            switch options.settings.mode {
            case .dense, .sketch:
                break  // the sum or sketch is made when the first shard arrives
            case .power:
                var finder = try RangeFinder(rows: layer.rows, cols: layer.cols, parameters: options.settings.randomizedSVD, layerName: layer.name)
                let step = finder.start()
                finders[index] = finder
                advancePower(index, step: step, round: 0)
            }
        } catch {
            perform(machine.fail("\(error)"))
        }
    }

    private func advancePower(_ index: Int, step: RangeFinder.Step, round: UInt32) {
        switch step {
        case .finished(let svd):
            finalize(index, svd: svd)
        case .need(let request):
            let message: PowerRequest
            switch request {
            case .range(let x):
                message = PowerRequest(layerIndex: UInt32(index), round: round, side: .range, matrixRows: UInt32(x.rows), matrixCols: UInt32(x.cols), values: x.storage)
            case .coRange(let x):
                message = PowerRequest(layerIndex: UInt32(index), round: round, side: .corange, matrixRows: UInt32(x.rows), matrixCols: UInt32(x.cols), values: x.storage)
            case .gram:
                preconditionFailure("the coordinator's range finder never fuses passes: workers hold only shares of G")
            }
            powerReplies[index] = [:]
            perform(machine.powerRequestReady(layer: index, message))
        }
    }

    private func completePowerRound(_ index: Int) {
        guard let replies = powerReplies[index], var finder = finders[index] else { return }
        // Sum in worker-id order: the same inputs give the same bits, whoever answered first.
        var sum: Matrix?
        for worker in replies.keys.sorted() {
            if sum == nil { sum = replies[worker] } else { sum!.add(replies[worker]!) }
        }
        let round = UInt32(finder.passesDone)
        do {
            let step = try finder.advance(with: sum!)
            finders[index] = finder
            advancePower(index, step: step, round: round)
        } catch {
            perform(machine.fail("\(error)"))
        }
    }

    /// A power-mode layer: the range finder's result is the SVD; factors cost nothing.
    private func finalize(_ index: Int, svd: TruncatedSVD) {
        let transferred = layerStarted[index].map { seconds(since: $0) } ?? 0
        let factors = LoRAFactors(svd: svd, configuration: options.settings.lora)
        // ‖Σ G_w‖ is not linear in the workers' data: `lora-ga verify` measures fidelity.
        record(index, factors: factors, svd: svd, fidelity: nil, transferred: transferred, computed: 0)
    }

    /// A dense or sketch layer every worker committed: its SVD runs on the finalize thread
    /// while this one keeps taking the next open layer's shards (the machine's window), so
    /// ingest does not stop for factorization. A committed layer is never restarted, and
    /// the result is dropped if the job ended meanwhile.
    private func finalizeInBackground(_ index: Int) {
        guard accumulators[index] != nil else { return }
        // Moved, not copied, into the job: the sum's memory must have one owner to be reused.
        let job = FinalizeJob(accumulators.removeValue(forKey: index)!)
        let transferred = (firstShard[index] ?? layerStarted[index]).map { seconds(since: $0) } ?? 0
        firstShard[index] = nil
        if firstShard.isEmpty, let since = receivingSince {
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
                self.failureKind = ExitStatus.kind(of: error)
                self.perform(self.machine.fail("layer '\(job.name)': \(error)"))
            }
        }
    }

    /// Checkpoints a finished layer, logs it, and tells the state machine.
    private func record(_ index: Int, factors: LoRAFactors, svd: TruncatedSVD, fidelity: Double?, transferred: Double, computed: Double) {
        let layer = machine.layers![index]
        let settings = options.settings
        let bytes = layerBytes[index] ?? 0
        let report = LayerReport(name: layer.name, outFeatures: layer.rows, inFeatures: layer.cols, mode: settings.mode,
                                 singularValues: svd.s.map(Double.init), fidelityEstimate: fidelity, seconds: transferred + computed, bytesIn: bytes)
        do {
            try store!.record(layer: layer, factors: factors, svd: svd, report: report)
        } catch {
            return perform(machine.fail("layer '\(layer.name)': \(error)"))
        }
        let done = machine.finished.count + 1
        // In power mode the time before finalizing is rounds of worker compute, not transfer.
        let timing = settings.mode == .power
            ? String(format: "%d power passes %.2f s, factors %.2f s", settings.passes, transferred, computed)
            : String(format: "transfer %.2f s (%.0f MB/s), factors %.2f s", transferred, Double(bytes) / 1e6 / max(transferred, 1e-9), computed)
        let eta = options.metrics.layerDone(seconds: transferred + computed)
        logger.info("[\(done)/\(machine.layers!.count)] \(LocalJob.describe(report).replacingOccurrences(of: "read", with: "received")); \(timing); \(eta)")
        accumulators[index] = nil
        progress[index] = nil
        finders[index] = nil
        powerReplies[index] = nil
        layerStarted[index] = nil
        layerBytes[index] = nil
        perform(machine.layerFinalized(index))
    }

    private func seconds(since start: ContinuousClock.Instant) -> Double {
        (ContinuousClock.now - start).seconds
    }

    private func finishJob() {
        do {
            try store!.writeAdapter(dtype: options.adapterDType, extraReport: ["workers": "\(options.expectedWorkers)"])
        } catch {
            return perform(machine.fail("writing the adapter: \(error)"))
        }
        let layers = machine.layers!.count
        let path = (options.outputDirectory as NSString).appendingPathComponent(PEFTAdapter.weightsFileName)
        for continuation in outbound.values {
            continuation.yield(.message(.jobDone(JobDone(adapterPath: path, layers: UInt32(layers)))))
            continuation.yield(.close)
        }
        let summary = CoordinatorSummary(
            layers: layers, bytesReceived: totalBytes, seconds: seconds(since: started),
            receivingSeconds: options.settings.mode == .power ? nil : receivingSeconds,
            worstFidelityEstimate: store!.finishedReports.compactMap(\.fidelityEstimate).max(),
            adapterDirectory: options.outputDirectory)
        complete(.success(summary))
    }

    private func complete(_ result: Result<CoordinatorSummary, JobError>) {
        guard outcome == nil else { return }
        outcome = result
        for timer in timers { timer.cancel() }
        timers = []
        if case .failure = result {
            for continuation in outbound.values { continuation.yield(.close) }
        }
        for waiter in waiters { waiter.resume(with: result.mapError { $0 as Error }) }
        waiters = []
    }

    /// A signal asked the coordinator to stop: workers are told to wait for its return, and
    /// the job ends unfinished. Every finished layer is already durable, so a restart resumes.
    public func shutdown(reason: String) {
        guard outcome == nil else { return }
        logger.warning("\(reason): stopping; finished layers are checkpointed in \(options.outputDirectory) and a restart resumes")
        for continuation in outbound.values {
            continuation.yield(.message(.goodbye(Goodbye(reason: "coordinator stopping (\(reason)); it resumes when restarted"))))
        }
        complete(.failure(JobError(.interrupted, "stopped by \(reason) before the job finished; restart with the same --out to resume")))
    }

    /// Returns when the job has finished (adapter written) or failed.
    public func result() async throws -> CoordinatorSummary {
        if let outcome { return try outcome.get() }
        return try await withCheckedThrowingContinuation { waiters.append($0) }
    }
}

// The wire names dtypes and modes exactly as Formats and Core spell them.
extension TensorDType {
    init(wire: WireDType) { self = TensorDType(rawValue: wire.description)! }
}

extension WireDType {
    init(_ dtype: TensorDType) { self = WireDType.allCases.first { $0.description == dtype.rawValue } ?? .f32 }
}

extension WireJobMode {
    init(_ mode: SVDMode) { self = WireJobMode.allCases.first { $0.description == mode.rawValue }! }
}

/// One layer's accumulator on its way through the finalize thread, and its sum's memory on
/// the way back. A class so the accumulator has exactly one owner at each step (a copy
/// captured by a closure would make the memory's next user copy 940 MB first).
private final class FinalizeJob: @unchecked Sendable {
    // The engine hands the job over before `run` and reads `spare` after it completes.
    private var accumulator: LayerAccumulator?
    private var spare: [Float]?
    let name: String
    typealias Outcome = Result<(factors: LoRAFactors, svd: TruncatedSVD, fidelityEstimate: Double?), Error>

    init(_ accumulator: consuming LayerAccumulator) {
        self.name = accumulator.name
        self.accumulator = accumulator
    }

    /// Runs on the finalize thread at nice 19. Receiving a layer keeps training nodes waiting,
    /// factoring one does not, so when they compete for cores receiving wins: measured from 2
    /// workers on one 2-core machine (EPYC), 16×4096² ingest 1.24-1.38 → 1.55-1.59 GB/s at
    /// nice 10 (nice 5: 1.43-1.48), 64×2048² 1.5 → 1.9 GB/s, the whole job as long as before
    /// (the window of open layers stops the workers until factoring catches up). On the Xeon,
    /// where factoring costs more against its memory bandwidth, nice 19 over 10: 64×2048²
    /// 1.05-1.28 → 1.23-1.34 GB/s, wall 4.5-5.6 → 3.8-4.9 s (8 alternating runs each). Linux
    /// keeps nice per thread; the thread is this job's alone.
    func run(settings: JobSettings) -> Outcome {
        #if os(Linux)
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)
        #endif
        var taken = accumulator.take()!
        defer { spare = taken.takeStorage() }
        return Result { try taken.finish(settings: settings) }
    }

    func takeSpare() -> [Float]? { spare.take() }
}
