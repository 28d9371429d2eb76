// Over 400 lines on purpose: one state machine whose rules (joining, consistency, coverage,
// the ledger, the end of the job) are read and tested together; its per-layer part is
// LayerLedger.swift.

import LoRAGADaemon
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire

/// The coordinator's bookkeeping as a pure value: which connections have greeted, which
/// workers hold a slot, which layers are open and what each worker delivered for them
/// (``LayerLedger``). It is fed events and returns actions that carry their data; it never
/// touches a socket, a clock or a matrix, so every crash and reconnect case is a unit test.
///
/// Rules it enforces (the reliability rules of the Architecture article):
/// - a slot goes only to a worker that greeted with the right protocol (and, when the job has
///   a secret, authenticated: the engine checks the proof before `helloReceived`) and then
///   announced a layer set consistent with the job; a worker id counts once;
/// - every worker announces the same layers (names, shapes); no worker is the reference:
///   two disagreeing workers (or a worker and the resumed job's manifest) fail the job at
///   once, naming both sides, since no set of workers containing both can be consistent;
/// - at most `window` layers are open; a layer finalizes when every worker's commit matched
///   what arrived (rows, shard count, checksum);
/// - a worker lost mid-layer has its partial contribution discarded: the layer restarts
///   under a new attempt for everyone (rows folded into a sum or sketch cannot be removed);
/// - the job is finished only once the adapter is written; a failure at any point, the last
///   write included, reaches every worker and the engine.
public struct JobStateMachine: Sendable {
    public typealias ConnectionID = Int

    public struct Configuration: Sendable, Equatable {
        public var expectedWorkers: Int
        public var mode: SVDMode
        /// Layers open at once (memory grows with it; 2 overlaps one layer's finalize with the next one's transfer).
        public var window: Int
        /// The dtype every shard must travel in.
        public var payloadDType: TensorDType
        /// Entries of a layer that no worker's blocks cover count as zeros, rather than failing
        /// the job (`--allow-uncovered`).
        public var allowUncovered: Bool

        public init(expectedWorkers: Int, mode: SVDMode, window: Int = 2, payloadDType: TensorDType = .f32, allowUncovered: Bool = false) {
            self.expectedWorkers = expectedWorkers
            self.mode = mode
            self.window = Swift.max(1, window)
            self.payloadDType = payloadDType
            self.allowUncovered = allowUncovered
        }
    }

    public enum Action: Sendable, Equatable {
        case send(ConnectionID, WireMessage)
        /// Send this error, then close the connection; the job goes on.
        case refuse(ConnectionID, ErrorMessage)
        /// The peer greeted correctly: send it the job's spec (it may now send larger frames).
        case sendJobSpec(ConnectionID)
        /// The job's layer set is now known (every expected worker announced it).
        case layersKnown([GradientLayer])
        /// Allocate the layer's accumulator (dense, sketch) or start its range finder (power).
        case openLayer(Int, GradientLayer)
        /// Zero the layer's sum or sketch; every worker resends under `attempt`.
        case restartLayer(Int, attempt: UInt32)
        /// Every worker committed: compute factors, checkpoint, then report `layerFinalized`.
        case finalizeLayer(Int, GradientLayer)
        /// Power: every worker answered the outstanding request of this layer.
        case powerRoundComplete(Int)
        /// Every layer is durable: write the adapter, then report `adapterWritten` or `fail`.
        case writeAdapter
        /// The adapter is written: tell every worker (JobDone) and end the job successfully.
        case jobDone(workers: [ConnectionID])
        case failJob(JobError)
        /// A worker left while the job runs: it must rejoin in time or the job fails.
        case startRejoinTimer(worker: String)
    }

    /// What to do with a power reply from a connection.
    public enum Verdict: Sendable, Equatable {
        case accept(worker: String)
        /// Late data of an older round or a duplicate: drop it silently.
        case ignore
        /// A protocol violation: refuse the connection with this message.
        case violation(String)
    }

    /// What to do with a shard whose header just arrived.
    public enum ShardVerdict: Sendable, Equatable {
        /// Fold its rows into the layer; report `shardEnded` with the checksum's verdict.
        case accept(worker: String, layer: GradientLayer)
        case ignore
        case refuse(ErrorMessage)
    }

    enum ConnectionState: Sendable, Equatable {
        /// Greeted (and authenticated); holds no slot until its announcement is accepted.
        case greeted(worker: String)
        case active(worker: String)

        var worker: String {
            switch self {
            case .greeted(let worker), .active(let worker): worker
            }
        }
    }

    public enum Phase: Sendable, Equatable {
        case gathering
        case running
        /// Every layer is durable; the adapter is being written.
        case finishing
        case finished
        case failed(String)
    }

    public let configuration: Configuration
    public private(set) var phase: Phase = .gathering
    public private(set) var layers: [GradientLayer]?
    /// Where the layer set came from: a resumed job's manifest, or nil (the workers).
    private let layersFromManifest: Bool
    public private(set) var finished: Set<Int>
    private var open: [Int: LayerLedger] = [:]
    private var connections: [ConnectionID: ConnectionState] = [:]
    /// The shard arriving on each connection, once accepted.
    private var inFlight: [ConnectionID: (layer: Int, shard: LayerLedger.InFlight)] = [:]
    /// Slot holders: worker id → its live connection (nil while away mid-job).
    private var workers: [String: ConnectionID?] = [:]
    /// What each slot holder announced: its layers and, for a worker whose files hold blocks,
    /// the blocks of each layer it holds (none: whole layers).
    struct Announcement: Sendable, Equatable {
        var layers: [GradientLayer]
        var regions: [String: [LayerRegion]]
        /// Holds blocks: may lack layers (another worker's blocks cover them).
        var sharded: Bool { !regions.isEmpty }
    }
    private var announcements: [String: Announcement] = [:]
    /// Per job layer: the workers that announced it (they send it, commit it, answer its rounds).
    private var holders: [Int: Set<String>] = [:]

    /// - Parameters:
    ///   - layers: the job's layers when known up front (a resumed job's manifest).
    ///   - finished: layer indices already durable on disk.
    public init(configuration: Configuration, layers: [GradientLayer]? = nil, finished: Set<Int> = []) {
        self.configuration = configuration
        self.layers = layers
        self.layersFromManifest = layers != nil
        self.finished = finished
    }

    public var openLayers: [Int] { open.keys.sorted() }
    public func attempt(of layer: Int) -> UInt32? { open[layer]?.attempt }
    public func worker(on connection: ConnectionID) -> String? { connections[connection]?.worker }
    /// Whether the connection greeted successfully (it may send more than handshake frames).
    public func hasGreeted(_ connection: ConnectionID) -> Bool { connections[connection] != nil }
    /// Whether the connection holds a worker's slot (greeted and announced).
    public func isActive(_ connection: ConnectionID) -> Bool {
        if case .active = connections[connection] { return true }
        return false
    }
    /// Workers holding a slot (announced and accepted), present or away.
    public var workerIDs: [String] { workers.keys.sorted() }
    public var finishedLayerNames: [String] { layers.map { l in finished.sorted().map { l[$0].name } } ?? [] }
    private var isPower: Bool { configuration.mode == .power }

    // MARK: - Handshake

    /// A Hello whose proof (if the job has a secret) the engine has already verified.
    public mutating func helloReceived(on connection: ConnectionID, _ hello: Hello) -> [Action] {
        guard phase == .gathering || phase == .running else {
            return [.refuse(connection, ErrorMessage(code: .jobFailed, message: "the job is no longer accepting workers"))]
        }
        guard hello.protocolVersion == WireProtocol.version else {
            return [.refuse(connection, ErrorMessage(code: .badVersion, message: "protocol version \(hello.protocolVersion) is not supported; this coordinator speaks version \(WireProtocol.version)"))]
        }
        let id = hello.workerID
        let live = connections.values.contains { $0.worker == id }
        guard !live else {
            return [.refuse(connection, ErrorMessage(code: .duplicateWorker, message: "worker id '\(id)' is already connected; give every worker a distinct --id"))]
        }
        if phase == .running, workers[id] == nil {
            return [.refuse(connection, ErrorMessage(code: .duplicateWorker, message: "the job is running with workers \(workerIDs.joined(separator: ", ")); '\(id)' is not one of them"))]
        }
        connections[connection] = .greeted(worker: id)
        return [.sendJobSpec(connection)]
    }

    /// - Parameter regions: per layer, the blocks this worker holds when its files declare
    ///   blocks; empty for a worker holding whole layers.
    public mutating func announced(on connection: ConnectionID, layers announcedLayers: [GradientLayer], regions: [String: [LayerRegion]] = [:]) -> [Action] {
        guard case .greeted(let id) = connections[connection] else {
            return [.refuse(connection, ErrorMessage(code: .layerMismatch, message: "Announce before Hello, or twice"))]
        }
        guard !announcedLayers.isEmpty else {
            connections[connection] = nil
            return [.refuse(connection, ErrorMessage(code: .layerMismatch, message: "worker '\(id)' announced no layers"))]
        }
        if workers[id] == nil, phase != .gathering || workers.count >= configuration.expectedWorkers {
            connections[connection] = nil
            return [.refuse(connection, ErrorMessage(code: .duplicateWorker, message: "the job expects \(configuration.expectedWorkers) workers and has them (\(workerIDs.joined(separator: ", "))); '\(id)' is not one of them"))]
        }
        let announcement = Announcement(layers: announcedLayers, regions: regions.filter { !$0.value.isEmpty })
        // Consistency is a property of the set: against the manifest, and every other announcement.
        if let reference = layers, layersFromManifest || phase != .gathering {
            let name = layersFromManifest ? "the resumed job's manifest" : "the job"
            if let problem = JobStateMachine.conflict(reference, announcedLayers, referenceName: name, worker: id, requireAll: !announcement.sharded) {
                return conflictFails(problem, connection: connection)
            }
        }
        if let before = announcements[id], before != announcement {
            return conflictFails((.layerMismatch, "worker '\(id)' came back with other layers or blocks than it announced before"), connection: connection)
        }
        for (other, theirs) in announcements.sorted(by: { $0.key < $1.key }) where other != id {
            if let problem = JobStateMachine.conflict(theirs.layers, announcedLayers, referenceName: "worker '\(other)'", worker: id,
                                                     requireAll: !announcement.sharded && !theirs.sharded) {
                return conflictFails(problem, connection: connection)
            }
        }
        connections[connection] = .active(worker: id)
        workers[id] = connection
        announcements[id] = announcement
        var actions: [Action] = []
        switch phase {
        case .gathering:
            if workers.count == configuration.expectedWorkers {
                if let problem = startJob() { return conflictFails(problem, connection: connection) }
                actions.append(.layersKnown(layers!))
                phase = .running
                actions += openNextLayers()
            }
        case .running:
            actions += replay(to: connection, worker: id)
        case .finishing, .finished, .failed:
            break
        }
        return actions
    }

    /// Every worker announced: the job's layers are the union of theirs (or the manifest's),
    /// whole-layer workers must hold every layer, and every layer must be covered.
    private mutating func startJob() -> (code: WireErrorCode, message: String)? {
        var union: [String: GradientLayer] = [:]
        for announcement in announcements.values { for layer in announcement.layers { union[layer.name] = union[layer.name] ?? layer } }
        let jobLayers = layers ?? union.keys.sorted().map { union[$0]! }
        for (worker, announcement) in announcements.sorted(by: { $0.key < $1.key }) where !announcement.sharded {
            if let problem = JobStateMachine.conflict(jobLayers, announcement.layers, referenceName: "the job", worker: worker, requireAll: true) {
                return problem
            }
        }
        if let extra = union.keys.sorted().first(where: { name in !jobLayers.contains { $0.name == name } }) {
            return (.layerMismatch, "layer '\(extra)' is not part of the resumed job's manifest")
        }
        for (index, layer) in jobLayers.enumerated() {
            let holding = announcements.filter { $0.value.layers.contains { $0.name == layer.name } }
            holders[index] = Set(holding.keys)
            guard !holding.values.contains(where: { !$0.sharded }) else { continue }
            let regions = holding.values.flatMap { $0.regions[layer.name] ?? [] }
            let coverage = LayerCoverage(rows: layer.rows, cols: layer.cols, regions: regions)
            guard coverage.isComplete || configuration.allowUncovered else {
                return (.layerMismatch, "layer '\(layer.name)' (\(layer.rows)×\(layer.cols)) is not covered by the workers' blocks: \(coverage.describeUncovered())")
            }
        }
        layers = jobLayers
        return nil
    }

    /// Layers whose workers' blocks leave entries uncovered (accepted as zeros with
    /// `allowUncovered`), with the uncovered rectangles, for the job's log.
    public func uncoveredParts() -> [(layer: String, uncovered: String)] {
        guard let layers else { return [] }
        return layers.enumerated().compactMap { index, layer in
            let holding = (holders[index] ?? []).compactMap { announcements[$0] }
            guard !holding.isEmpty, holding.allSatisfy(\.sharded) else { return nil }
            let coverage = LayerCoverage(rows: layer.rows, cols: layer.cols, regions: holding.flatMap { $0.regions[layer.name] ?? [] })
            return coverage.isComplete ? nil : (layer.name, coverage.describeUncovered())
        }
    }

    /// Which worker holds which part of each layer, for the job's log.
    public func contributions() -> [(layer: String, worker: String, part: String)] {
        guard let layers else { return [] }
        var result: [(layer: String, worker: String, part: String)] = []
        for (index, layer) in layers.enumerated() {
            for worker in (holders[index] ?? []).sorted() {
                let regions = announcements[worker]?.regions[layer.name] ?? []
                result.append((layer.name, worker, regions.isEmpty ? "whole" : regions.map(\.description).joined(separator: ", ")))
            }
        }
        return result
    }

    private mutating func conflictFails(_ problem: (code: WireErrorCode, message: String), connection: ConnectionID) -> [Action] {
        let error = JobError(.badInput, "inconsistent workers: " + problem.message)
        return [.refuse(connection, ErrorMessage(code: problem.code, message: error.message))] + fail(error)
    }

    /// Why `theirs` (announced by `worker`) cannot be the same job as `reference`, or nil.
    /// - Parameter requireAll: both sides must hold the same layers (whole-layer workers); else
    ///   only the layers they share must agree (workers holding blocks may lack a layer).
    static func conflict(_ reference: [GradientLayer], _ theirs: [GradientLayer], referenceName: String, worker: String, requireAll: Bool = true) -> (code: WireErrorCode, message: String)? {
        let byName = Dictionary(theirs.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for layer in reference {
            guard let other = byName[layer.name] else {
                if !requireAll { continue }
                return (.layerMismatch, "worker '\(worker)' has no layer '\(layer.name)' (\(referenceName) has it, \(layer.rows)×\(layer.cols))")
            }
            if other.rows != layer.rows || other.cols != layer.cols {
                return (.shapeMismatch, "layer '\(layer.name)' is \(other.rows)×\(other.cols) on worker '\(worker)' but \(layer.rows)×\(layer.cols) on \(referenceName)")
            }
        }
        if requireAll, theirs.count != reference.count {
            let extra = theirs.first { layer in !reference.contains { $0.name == layer.name } }
            return (.layerMismatch, "worker '\(worker)' announced \(theirs.count) layers, \(referenceName) has \(reference.count)" + (extra.map { " (extra: '\($0.name)')" } ?? ""))
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
                let holding = holders[candidate] ?? Set(workers.keys)
                open[candidate] = LayerLedger(index: candidate, layer: layers[candidate], holders: holding, plans: plans(of: layers[candidate], for: holding))
                // Power mode too: LayerBegin names the layer its power requests refer to by index.
                actions += broadcast(.layerBegin(LayerBegin(layerIndex: UInt32(candidate), name: layers[candidate].name, attempt: 0)), to: holding)
                actions.append(.openLayer(candidate, layers[candidate]))
            }
            candidate += 1
        }
        if open.isEmpty && finished.count == layers.count {
            phase = .finishing
            actions.append(.writeAdapter)
        }
        return actions
    }

    /// Per holder of `layer` that announced blocks of it, the rectangles it sends: the disjoint
    /// cover of its blocks, in the order the worker derives from the same announcement.
    private func plans(of layer: GradientLayer, for holding: Set<String>) -> [String: [LayerRegion]] {
        var plans: [String: [LayerRegion]] = [:]
        for worker in holding {
            guard let regions = announcements[worker]?.regions[layer.name], !regions.isEmpty else { continue }
            plans[worker] = LayerCoverage(rows: layer.rows, cols: layer.cols, regions: regions).disjointCover
        }
        return plans
    }

    /// Power: the rows of a reply from `worker` to the current request on `layer` — the rows of
    /// the product its share can make nonzero; nil when the layer is not open.
    public func replySpans(layer: Int, worker: String, side: WirePowerSide) -> [Range<Int>]? {
        open[layer]?.productSpans(of: worker, side: side)
    }

    /// The workers that hold part of open layer `layer` (each answers its power rounds).
    public func holders(of layer: Int) -> Set<String>? {
        open[layer]?.holders
    }

    /// `request` as `worker` gets it: only the rows of X its share multiplies.
    private func request(_ request: PowerRequest, for worker: String, ledger: LayerLedger) -> PowerRequest {
        request.restricted(to: ledger.operandSpans(of: worker, side: request.side))
    }

    /// A (re)joined worker gets every open layer it still owes.
    private func replay(to connection: ConnectionID, worker: String) -> [Action] {
        var actions: [Action] = []
        for index in open.keys.sorted() where open[index]!.holders.contains(worker) {
            let ledger = open[index]!
            let begin = WireMessage.layerBegin(LayerBegin(layerIndex: UInt32(index), name: ledger.layer.name, attempt: ledger.attempt))
            if isPower {
                actions.append(.send(connection, begin))
                if let request = ledger.powerRequest, ledger.powerPending.contains(worker) {
                    actions.append(.send(connection, .powerRequest(self.request(request, for: worker, ledger: ledger))))
                }
            } else if !ledger.committed.contains(worker) {
                actions.append(.send(connection, begin))
            }
        }
        return actions
    }

    /// A shard's header arrived (its rows follow): checked against the layer's ledger.
    public mutating func shardBegan(on connection: ConnectionID, _ shard: Shard) -> ShardVerdict {
        guard case .active(let worker) = connections[connection] else {
            return .refuse(ErrorMessage(code: .badData, message: "Shard before the handshake finished"))
        }
        guard !isPower else { return .refuse(ErrorMessage(code: .badData, message: "Shard in a power-mode job")) }
        let index = Int(shard.layerIndex)
        guard let ledger = open[index] else {
            if finished.contains(index) || (layers.map { index < $0.count } ?? false) { return .ignore }
            return .refuse(ErrorMessage(code: .badData, message: "Shard for unknown layer index \(index)"))
        }
        switch ledger.check(shard: shard, from: worker, payloadDType: configuration.payloadDType) {
        case .ignore:
            return .ignore
        case .violation(let code, let message):
            return .refuse(ErrorMessage(code: code, message: message))
        case .accept(let inFlight):
            self.inFlight[connection] = (index, inFlight)
            open[index]!.markDirty(worker)
            return .accept(worker: worker, layer: ledger.layer)
        }
    }

    /// The shard on `connection` arrived whole; `checksumMatches` is the decoder's verdict.
    public mutating func shardEnded(on connection: ConnectionID, checksumMatches: Bool) -> [Action] {
        guard let (index, shard) = inFlight.removeValue(forKey: connection) else { return [] }
        guard checksumMatches else {
            // Its rows are in the sum already: refusing the connection discards the worker's
            // uncommitted rows of the layer (the layer restarts), as a bad commit does.
            let name = layers?[index].name ?? "#\(index)"
            return [.refuse(connection, ErrorMessage(code: .badData, message: "layer '\(name)': shard rows \(shard.rowStart)..<\(shard.rowStart + shard.rows) do not match their checksum; reconnect to resend"))]
        }
        _ = open[index]?.shardCompleted(shard)
        return []
    }

    /// A worker committed a layer: counted only if it matches what arrived.
    public mutating func committed(on connection: ConnectionID, _ commit: LayerCommit) -> [Action] {
        guard case .active(let worker) = connections[connection] else {
            return [.refuse(connection, ErrorMessage(code: .badData, message: "LayerCommit before the handshake finished"))]
        }
        let index = Int(commit.layerIndex)
        guard open[index] != nil else { return [] }   // a finished layer: already counted
        switch open[index]!.commit(commit, from: worker) {
        case .ignored:
            return []
        case .mismatch(let message):
            return [.refuse(connection, ErrorMessage(code: .badData, message: message))]
        case .counted:
            let ledger = open[index]!
            return ledger.isComplete ? [.finalizeLayer(index, ledger.layer)] : []
        }
    }

    /// The layer's checkpoint is durable: tell the workers, open the next layer.
    public mutating func layerFinalized(_ layer: Int) -> [Action] {
        guard phase == .running, open.removeValue(forKey: layer) != nil else { return [] }
        finished.insert(layer)
        return broadcast(.layerDone(LayerDone(layerIndex: UInt32(layer)))) + openNextLayers()
    }

    /// The adapter is on disk: the job is done.
    public mutating func adapterWritten() -> [Action] {
        guard phase == .finishing else { return [] }
        phase = .finished
        let active = connections.keys.sorted().filter { if case .active = connections[$0] { return true } else { return false } }
        return [.jobDone(workers: active)]
    }

    // MARK: - Power rounds

    /// The engine has the next request of a layer's range finder: every worker must answer it.
    public mutating func powerRequestReady(layer: Int, _ request: PowerRequest) -> [Action] {
        guard open[layer] != nil else { return [] }
        let holding = open[layer]!.holders
        open[layer]!.setPowerRequest(request, workers: holding)
        let ledger = open[layer]!
        // Each worker gets only the rows of X its share multiplies.
        return connections.keys.sorted().compactMap { connection in
            guard case .active(let worker) = connections[connection], holding.contains(worker) else { return nil }
            return .send(connection, .powerRequest(self.request(request, for: worker, ledger: ledger)))
        }
    }

    public func powerReplyArrived(on connection: ConnectionID, layer: Int, round: UInt32) -> Verdict {
        guard case .active(let worker) = connections[connection] else { return .violation("PowerReply before the handshake finished") }
        guard isPower else { return .violation("PowerReply in a \(configuration.mode.rawValue)-mode job") }
        guard let ledger = open[layer] else { return .ignore }
        switch ledger.expectsReply(round: round, from: worker) {
        case true?: return .accept(worker: worker)
        case false?: return .ignore   // an older round, or a duplicate answer
        case nil: return .violation("PowerReply for round \(round) of layer \(layer), current is \(ledger.powerRequest?.round ?? 0)")
        }
    }

    /// Called after an accepted reply was stored; completes the round when nobody owes one.
    public mutating func powerReplyStored(layer: Int, worker: String) -> [Action] {
        guard open[layer] != nil else { return [] }
        return open[layer]!.replyStored(from: worker) ? [.powerRoundComplete(layer)] : []
    }

    // MARK: - Failures and stalls

    public mutating func connectionClosed(_ connection: ConnectionID) -> [Action] {
        inFlight[connection] = nil
        guard let state = connections.removeValue(forKey: connection) else { return [] }
        guard case .active(let worker) = state else { return [] }   // greeted only: it held nothing
        switch phase {
        case .gathering:
            workers[worker] = nil
            announcements[worker] = nil
            return []
        case .running:
            workers[worker] = .some(nil)
        case .finishing, .finished, .failed:
            workers[worker] = .some(nil)
            return []
        }
        var actions: [Action] = [.startRejoinTimer(worker: worker)]
        guard !isPower else { return actions }   // power: the worker answers again when back
        for index in open.keys.sorted() where open[index]!.dirty.contains(worker) && !open[index]!.committed.contains(worker) {
            // Dense sums and sketches fold rows in as they arrive (memory stays one layer's
            // state however many workers there are), so a partial contribution cannot be taken
            // out again: the layer starts over under a new attempt for everyone.
            open[index]!.restart()
            let attempt = open[index]!.attempt
            // A shard of the old attempt still arriving elsewhere must not reach the new sum.
            inFlight = inFlight.filter { $0.value.layer != index }
            actions.append(.restartLayer(index, attempt: attempt))
            actions += broadcast(.layerBegin(LayerBegin(layerIndex: UInt32(index), name: open[index]!.layer.name, attempt: attempt)), to: open[index]!.holders)
        }
        return actions
    }

    /// The rejoin timer of a worker ran out; fails the job unless the worker is back.
    public mutating func rejoinTimedOut(worker: String, after seconds: Double) -> [Action] {
        guard phase == .running, let slot = workers[worker], slot == nil else { return [] }
        return fail(JobError(.interrupted, "worker '\(worker)' left and did not come back within \(Int(seconds)) s; no adapter is written from a partial sum (restart the job to resume from its finished layers)"))
    }

    /// A worker reported that it cannot take part (unreadable files, bad data): no correct
    /// adapter can follow, so the job fails at once with its reason.
    public mutating func workerReported(on connection: ConnectionID, _ error: ErrorMessage) -> [Action] {
        guard let worker = worker(on: connection) else { return [] }
        return fail(JobError(.badInput, "worker '\(worker)' cannot take part: \(error.message)"))
    }

    /// What each present worker still owes the open layers (for stall warnings).
    public func outstanding() -> [String: [String]] {
        var owed: [String: [String]] = [:]
        for (worker, connection) in workers where connection != nil {
            let items = open.keys.sorted().compactMap { open[$0]!.owed(by: worker, power: isPower) }
            if !items.isEmpty { owed[worker] = items }
        }
        return owed
    }

    public mutating func fail(_ error: JobError) -> [Action] {
        switch phase {
        case .finished, .failed: return []
        case .gathering, .running, .finishing: break
        }
        phase = .failed(error.message)
        return broadcast(.error(ErrorMessage(code: .jobFailed, message: error.message))) + [.failJob(error)]
    }

    /// `message` to every active connection, or only to those of `workers`.
    private func broadcast(_ message: WireMessage, to workers: Set<String>? = nil) -> [Action] {
        connections.keys.sorted().compactMap { connection in
            guard case .active(let worker) = connections[connection], workers?.contains(worker) ?? true else { return nil }
            return .send(connection, message)
        }
    }
}
