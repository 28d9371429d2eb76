import LoRAGACore
import LoRAGAFormats
import LoRAGAWire

/// The coordinator's bookkeeping as a pure value: which workers are connected, which layers
/// are open, who has committed what. It is fed events and returns actions; it never touches
/// a socket or a matrix, so every crash and reconnect case is an ordinary unit test.
///
/// Rules it enforces (DESIGN.md §4–5):
/// - a worker counts once: a second live connection with the same id is refused;
/// - every worker announces the same layers (names, shapes) — the first announcement, or
///   the manifest of a resumed job, is the reference;
/// - at most `window` layers are open; a layer finalizes when every worker committed it;
/// - a layer finalizes only on every worker's verified commit; a worker lost mid-layer has
///   its partial contribution discarded: the layer restarts under a new attempt for everyone,
///   because rows already folded into a sum or sketch cannot be taken out again.
public struct JobStateMachine: Sendable {
    public typealias ConnectionID = Int

    public struct Configuration: Sendable, Equatable {
        public var expectedWorkers: Int
        public var mode: SVDMode
        /// Layers open at once (memory grows with it; 2 overlaps one layer's finalize with the next one's transfer).
        public var window: Int

        public init(expectedWorkers: Int, mode: SVDMode, window: Int = 2) {
            self.expectedWorkers = expectedWorkers
            self.mode = mode
            self.window = Swift.max(1, window)
        }
    }

    public enum Action: Sendable, Equatable {
        case send(ConnectionID, WireMessage)
        /// Send this error, then close the connection; the job goes on.
        case refuse(ConnectionID, ErrorMessage)
        case sendJobSpec(ConnectionID)
        /// The job's layer set is now known (first valid announcement).
        case layersKnown([GradientLayer])
        /// Allocate the layer's accumulator (dense, sketch) or start its range finder (power).
        case openLayer(Int)
        /// Zero the layer's sum or sketch; every worker resends under `attempt`.
        case restartLayer(Int, attempt: UInt32)
        /// Every worker committed: compute factors, checkpoint, then report `layerFinalized`.
        case finalizeLayer(Int)
        /// Power: every worker answered the outstanding request of this layer.
        case powerRoundComplete(Int)
        case finishJob
        case failJob(String)
        /// A worker left while the job runs: it must rejoin in time or the job fails.
        case startRejoinTimer(worker: String)
    }

    /// What to do with a data message (shard or power reply) from a connection.
    public enum Verdict: Sendable, Equatable {
        case accept(worker: String)
        /// Late data of an older attempt or a duplicate: drop it silently.
        case ignore
        /// A protocol violation: refuse the connection with this message.
        case violation(String)
    }

    enum ConnectionState: Sendable, Equatable {
        case awaitingAnnounce(worker: String)
        case active(worker: String)
    }

    struct OpenLayer: Sendable, Equatable {
        var attempt: UInt32 = 0
        var committed: Set<String> = []
        /// Workers that sent data for the current attempt (dense: their data is in the sum).
        var dirty: Set<String> = []
        /// Power: the request every worker must answer, and who still owes an answer.
        var powerRequest: PowerRequest?
        var powerPending: Set<String> = []
    }

    public enum Phase: Sendable, Equatable {
        case gathering
        case running
        case finished
        case failed(String)
    }

    public let configuration: Configuration
    public private(set) var phase: Phase = .gathering
    public private(set) var layers: [GradientLayer]?
    /// Which connection announced the reference layer set (for error messages).
    private var referenceWorker: String?
    public private(set) var finished: Set<Int>
    private var open: [Int: OpenLayer] = [:]
    private var connections: [ConnectionID: ConnectionState] = [:]
    /// Worker id → its live connection (nil while away).
    private var workers: [String: ConnectionID?] = [:]
    private var announced: Set<String> = []

    /// - Parameters:
    ///   - layers: the job's layers when known up front (a resumed job's manifest).
    ///   - finished: layer indices already durable on disk.
    public init(configuration: Configuration, layers: [GradientLayer]? = nil, finished: Set<Int> = []) {
        self.configuration = configuration
        self.layers = layers
        self.finished = finished
    }

    public var openLayers: [Int] { open.keys.sorted() }
    public func attempt(of layer: Int) -> UInt32? { open[layer]?.attempt }
    public func worker(on connection: ConnectionID) -> String? {
        switch connections[connection] {
        case .awaitingAnnounce(let worker), .active(let worker): return worker
        case nil: return nil
        }
    }
    public var workerIDs: [String] { workers.keys.sorted() }
    public var finishedLayerNames: [String] { layers.map { l in finished.sorted().map { l[$0].name } } ?? [] }

    // MARK: - Handshake

    public mutating func helloReceived(on connection: ConnectionID, _ hello: Hello) -> [Action] {
        guard phase == .gathering || phase == .running else {
            return [.refuse(connection, ErrorMessage(code: .jobFailed, message: "the job is no longer accepting workers"))]
        }
        guard hello.protocolVersion == WireProtocol.version else {
            return [.refuse(connection, ErrorMessage(code: .badVersion, message: "protocol version \(hello.protocolVersion) is not supported; this coordinator speaks version \(WireProtocol.version)"))]
        }
        let id = hello.workerID
        if let existing = workers[id] {
            if existing != nil {
                return [.refuse(connection, ErrorMessage(code: .duplicateWorker, message: "worker id '\(id)' is already connected; give every worker a distinct --id"))]
            }
        } else if workers.count >= configuration.expectedWorkers {
            return [.refuse(connection, ErrorMessage(code: .duplicateWorker, message: "the job expects \(configuration.expectedWorkers) workers and has them (\(workerIDs.joined(separator: ", "))); '\(id)' is not one of them"))]
        }
        workers[id] = connection
        connections[connection] = .awaitingAnnounce(worker: id)
        return [.sendJobSpec(connection)]
    }

    public mutating func announced(on connection: ConnectionID, layers announcedLayers: [GradientLayer]) -> [Action] {
        guard case .awaitingAnnounce(let id) = connections[connection] else {
            return [.refuse(connection, ErrorMessage(code: .layerMismatch, message: "Announce before Hello, or twice"))]
        }
        if let reference = layers {
            if let problem = JobStateMachine.mismatch(reference: reference, announced: announcedLayers, worker: id, referenceWorker: referenceWorker) {
                forget(connection: connection, worker: id, keepSlot: phase == .running)
                return [.refuse(connection, ErrorMessage(code: problem.code, message: problem.message))]
            }
        }
        var actions: [Action] = []
        if layers == nil {
            guard !announcedLayers.isEmpty else {
                forget(connection: connection, worker: id, keepSlot: false)
                return [.refuse(connection, ErrorMessage(code: .layerMismatch, message: "worker '\(id)' announced no layers"))]
            }
            layers = announcedLayers
            referenceWorker = id
            actions.append(.layersKnown(announcedLayers))
        }
        connections[connection] = .active(worker: id)
        announced.insert(id)
        switch phase {
        case .gathering:
            if announced.count == configuration.expectedWorkers {
                phase = .running
                actions += openNextLayers()
            }
        case .running:
            actions += replay(to: connection, worker: id)
        case .finished, .failed:
            break
        }
        return actions
    }

    static func mismatch(reference: [GradientLayer], announced: [GradientLayer], worker: String, referenceWorker: String?) -> (code: WireErrorCode, message: String)? {
        let source = referenceWorker.map { "worker '\($0)'" } ?? "the job's manifest"
        let byName = Dictionary(announced.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for layer in reference {
            guard let theirs = byName[layer.name] else {
                return (.layerMismatch, "worker '\(worker)' has no layer '\(layer.name)' (\(source) has it, \(layer.rows)×\(layer.cols))")
            }
            if theirs.rows != layer.rows || theirs.cols != layer.cols {
                return (.shapeMismatch, "worker '\(worker)': layer '\(layer.name)' is \(theirs.rows)×\(theirs.cols), but \(layer.rows)×\(layer.cols) in \(source)")
            }
        }
        if announced.count != reference.count {
            let extra = announced.first { layer in !reference.contains { $0.name == layer.name } }
            return (.layerMismatch, "worker '\(worker)' announced \(announced.count) layers, the job has \(reference.count)" + (extra.map { " (extra: '\($0.name)')" } ?? ""))
        }
        return nil
    }

    // MARK: - Layers

    private mutating func openNextLayers() -> [Action] {
        guard let layers, phase == .running else { return [] }
        var actions: [Action] = []
        var candidate = 0
        while open.count < configuration.window, candidate < layers.count {
            if !finished.contains(candidate) && open[candidate] == nil {
                open[candidate] = OpenLayer()
                // Power mode too: LayerBegin names the layer its power requests refer to by index.
                actions += broadcast(.layerBegin(LayerBegin(layerIndex: UInt32(candidate), name: layers[candidate].name, attempt: 0)))
                actions.append(.openLayer(candidate))
            }
            candidate += 1
        }
        if open.isEmpty && finished.count == layers.count {
            phase = .finished
            actions.append(.finishJob)
        }
        return actions
    }

    /// A (re)joined worker gets every open layer it still owes.
    private func replay(to connection: ConnectionID, worker: String) -> [Action] {
        guard let layers else { return [] }
        var actions: [Action] = []
        for index in open.keys.sorted() {
            let state = open[index]!
            if configuration.mode == .power {
                actions.append(.send(connection, .layerBegin(LayerBegin(layerIndex: UInt32(index), name: layers[index].name, attempt: state.attempt))))
                if let request = state.powerRequest, state.powerPending.contains(worker) {
                    actions.append(.send(connection, .powerRequest(request)))
                }
            } else if !state.committed.contains(worker) {
                actions.append(.send(connection, .layerBegin(LayerBegin(layerIndex: UInt32(index), name: layers[index].name, attempt: state.attempt))))
            }
        }
        return actions
    }

    /// A shard (dense, sketch) arrived; checks it belongs to an open layer's current attempt.
    public mutating func shardArrived(on connection: ConnectionID, layer: Int, attempt: UInt32) -> Verdict {
        guard case .active(let worker) = connections[connection] else { return .violation("Shard before the handshake finished") }
        guard configuration.mode != .power else { return .violation("Shard in a power-mode job") }
        guard let state = open[layer] else {
            if finished.contains(layer) || (layers.map { layer < $0.count } ?? false) { return .ignore }
            return .violation("Shard for unknown layer index \(layer)")
        }
        guard attempt == state.attempt else { return attempt < state.attempt ? .ignore : .violation("Shard for attempt \(attempt) of layer \(layer), current is \(state.attempt)") }
        guard !state.committed.contains(worker) else { return .violation("Shard for layer \(layer) after its commit") }
        open[layer]!.dirty.insert(worker)
        return .accept(worker: worker)
    }

    /// A worker committed a layer. `verified` says whether rows, shard count and checksum matched.
    public mutating func committed(on connection: ConnectionID, layer: Int, attempt: UInt32, verified: Bool) -> [Action] {
        guard case .active(let worker) = connections[connection] else {
            return [.refuse(connection, ErrorMessage(code: .badData, message: "LayerCommit before the handshake finished"))]
        }
        guard var state = open[layer], attempt == state.attempt else { return [] }   // stale attempt or finished layer
        guard !state.committed.contains(worker) else { return [] }                    // duplicate commit: already counted
        guard verified else {
            return [.refuse(connection, ErrorMessage(code: .badData, message: "layer \(layer): the commit does not match the shards received (rows, count or checksum); reconnect to resend"))]
        }
        state.committed.insert(worker)
        open[layer] = state
        return state.committed.count == configuration.expectedWorkers ? [.finalizeLayer(layer)] : []
    }

    /// The layer's checkpoint is durable: tell the workers, open the next layer.
    public mutating func layerFinalized(_ layer: Int) -> [Action] {
        guard open.removeValue(forKey: layer) != nil else { return [] }
        finished.insert(layer)
        return broadcast(.layerDone(LayerDone(layerIndex: UInt32(layer)))) + openNextLayers()
    }

    // MARK: - Power rounds

    /// The engine has the next request of a layer's range finder: every worker must answer it.
    public mutating func powerRequestReady(layer: Int, _ request: PowerRequest) -> [Action] {
        guard open[layer] != nil else { return [] }
        open[layer]!.powerRequest = request
        open[layer]!.powerPending = Set(workers.keys)
        return broadcast(.powerRequest(request))
    }

    public mutating func powerReplyArrived(on connection: ConnectionID, layer: Int, round: UInt32) -> Verdict {
        guard case .active(let worker) = connections[connection] else { return .violation("PowerReply before the handshake finished") }
        guard configuration.mode == .power else { return .violation("PowerReply in a \(configuration.mode.rawValue)-mode job") }
        guard let state = open[layer], let request = state.powerRequest else { return .ignore }
        guard round == request.round else { return round < request.round ? .ignore : .violation("PowerReply for round \(round) of layer \(layer), current is \(request.round)") }
        guard state.powerPending.contains(worker) else { return .ignore }   // duplicate answer
        return .accept(worker: worker)
    }

    /// Called after an accepted reply was stored; completes the round when nobody owes one.
    public mutating func powerReplyStored(layer: Int, worker: String) -> [Action] {
        guard open[layer] != nil else { return [] }
        open[layer]!.powerPending.remove(worker)
        return open[layer]!.powerPending.isEmpty ? [.powerRoundComplete(layer)] : []
    }

    // MARK: - Failures

    public mutating func connectionClosed(_ connection: ConnectionID) -> [Action] {
        guard let state = connections[connection] else { return [] }
        let worker: String
        switch state {
        case .awaitingAnnounce(let id), .active(let id): worker = id
        }
        let wasActive: Bool
        if case .active = state { wasActive = true } else { wasActive = false }
        forget(connection: connection, worker: worker, keepSlot: phase == .running && wasActive)
        guard phase == .running, wasActive else { return [] }
        var actions: [Action] = [.startRejoinTimer(worker: worker)]
        for index in open.keys.sorted() where open[index]!.dirty.contains(worker) && !open[index]!.committed.contains(worker) {
            // Dense sums and sketches both fold rows in as they arrive (memory stays one layer's
            // state however many workers there are), so a partial contribution cannot be taken
            // out again: the layer starts over under a new attempt for everyone.
            guard configuration.mode != .power else { continue }
            let attempt = open[index]!.attempt + 1
            open[index] = OpenLayer(attempt: attempt)
            actions.append(.restartLayer(index, attempt: attempt))
            if let layers {
                actions += broadcast(.layerBegin(LayerBegin(layerIndex: UInt32(index), name: layers[index].name, attempt: attempt)))
            }
        }
        return actions
    }

    /// The rejoin timer of a worker ran out; fails the job unless the worker is back.
    public mutating func rejoinTimedOut(worker: String, after seconds: Double) -> [Action] {
        guard phase == .running, let slot = workers[worker], slot == nil else { return [] }
        return fail("worker '\(worker)' left and did not come back within \(Int(seconds)) s; no adapter is written from a partial sum")
    }

    public mutating func fail(_ reason: String) -> [Action] {
        switch phase {
        case .finished, .failed: return []
        default: break
        }
        phase = .failed(reason)
        return broadcast(.error(ErrorMessage(code: .jobFailed, message: reason))) + [.failJob(reason)]
    }

    private mutating func forget(connection: ConnectionID, worker: String, keepSlot: Bool) {
        connections[connection] = nil
        if keepSlot {
            workers[worker] = .some(nil)
        } else {
            workers[worker] = nil
            announced.remove(worker)
        }
    }

    private func broadcast(_ message: WireMessage) -> [Action] {
        connections.keys.sorted().compactMap { connection in
            if case .active = connections[connection] { return .send(connection, message) }
            return nil
        }
    }
}
