import LoRAGACore
import LoRAGAFormats
import LoRAGAWire

/// One open layer's exactly-once ledger, a pure value: which attempt is current, what each
/// worker has sent for it (which of its rectangles, the next row there, shard count, running
/// checksum), who has committed, and, in power mode, the outstanding request and who still
/// owes an answer.
///
/// Each holder has a plan: the rectangles of the layer it must send, in order — the whole
/// layer for a worker holding it whole, else the disjoint cover of the blocks it announced
/// (``LayerCoverage/disjointCover``). Its shards must walk that plan: each shard the next
/// band of rows of the current rectangle, exactly as wide as the rectangle. A worker's
/// contribution counts only once its commit matches what this ledger saw arrive (every
/// rectangle complete, rows, shard count, checksum of the shard checksums in order); anything
/// else is refused and the worker resends after reconnecting.
struct LayerLedger: Sendable, Equatable {
    /// What one worker has delivered for the current attempt.
    struct Progress: Sendable, Equatable {
        /// The rectangle of the worker's plan being sent, and the next row expected in it.
        var rectangle = 0
        var nextRow: Int
        /// Rows of all shards so far (a commit states it).
        var rows = 0
        var shards: UInt32 = 0
        var checksum = ShardChecksum()

        init(plan: [LayerRegion]) {
            nextRow = plan.first?.rows.lowerBound ?? 0
        }
    }

    /// A shard whose rows are arriving on some connection.
    struct InFlight: Sendable, Equatable {
        var worker: String
        var attempt: UInt32
        var rowStart: Int
        var rows: Int
        var colStart: Int
        var cols: Int
        var checksum: UInt64

        var region: LayerRegion { LayerRegion(rows: rowStart..<(rowStart + rows), cols: colStart..<(colStart + cols)) }
    }

    let index: Int
    let layer: GradientLayer
    /// The workers that hold (part of) this layer: each must commit it, or answer its rounds.
    let holders: Set<String>
    /// Per holder, the rectangles it sends, in order (a holder missing here sends the whole layer).
    let plans: [String: [LayerRegion]]
    private(set) var attempt: UInt32 = 0
    private(set) var committed: Set<String> = []
    /// Workers whose data is folded into the current attempt's sum or sketch.
    private(set) var dirty: Set<String> = []
    private(set) var progress: [String: Progress] = [:]
    /// Power: the request every worker must answer, and who still owes an answer.
    private(set) var powerRequest: PowerRequest?
    private(set) var powerPending: Set<String> = []

    /// - Parameter plans: per holder, its rectangles (``LayerCoverage/disjointCover`` of its
    ///   blocks); holders not listed hold the whole layer.
    init(index: Int, layer: GradientLayer, holders: Set<String>, plans: [String: [LayerRegion]] = [:]) {
        self.index = index
        self.layer = layer
        self.holders = holders
        self.plans = plans.filter { !$0.value.isEmpty }
    }

    /// The rectangles `worker` sends, in order.
    func plan(of worker: String) -> [LayerRegion] {
        plans[worker] ?? [LayerRegion(wholeOf: layer.rows, layer.cols)]
    }

    /// Power: the rows of the product `worker`'s share can make nonzero — its rows for the range
    /// side (Y = G·P), its columns for the co-range side (Z = Gᵀ·Q), as sorted disjoint ranges.
    func productSpans(of worker: String, side: WirePowerSide) -> [Range<Int>] {
        let plan = plan(of: worker)
        return LayerCoverage.union(plan.map { side == .range ? $0.rows : $0.cols })
    }

    /// Power: the rows of the request's X that `worker`'s share multiplies — its columns for the
    /// range side (X = P, in × k), its rows for the co-range side (X = Q, out × k).
    func operandSpans(of worker: String, side: WirePowerSide) -> [Range<Int>] {
        productSpans(of: worker, side: side == .range ? .corange : .range)
    }

    /// Starts the layer over: every contribution so far is void.
    mutating func restart() {
        attempt += 1
        committed = []
        dirty = []
        progress = [:]
        powerRequest = nil
        powerPending = []
    }

    enum ShardCheck: Equatable {
        case accept(InFlight)
        /// Late data of an older attempt: dropped silently.
        case ignore
        case violation(WireErrorCode, String)
    }

    /// Checks a shard's header against the ledger before any of its rows is used.
    func check(shard: Shard, from worker: String, payloadDType: TensorDType) -> ShardCheck {
        guard shard.attempt == attempt else {
            return shard.attempt < attempt ? .ignore : .violation(.badData, "shard for attempt \(shard.attempt) of layer \(index), current is \(attempt)")
        }
        guard !committed.contains(worker) else {
            return .violation(.badData, "layer '\(layer.name)': shard after the worker's commit")
        }
        guard shard.colEnd <= UInt64(layer.cols), shard.rowEnd <= UInt64(layer.rows) else {
            return .violation(.shapeMismatch, "layer '\(layer.name)' is \(layer.rows)×\(layer.cols), the shard has rows \(shard.rowStart)..<\(shard.rowEnd), columns \(shard.colStart)..<\(shard.colEnd)")
        }
        let plan = plan(of: worker)
        let state = progress[worker] ?? Progress(plan: plan)
        guard state.rectangle < plan.count else {
            return .violation(.badData, "layer '\(layer.name)': shard rows \(shard.rowStart)..<\(shard.rowEnd), columns \(shard.colStart)..<\(shard.colEnd) after every part the worker announced (\(describe(plan)))")
        }
        let expected = plan[state.rectangle]
        guard shard.rowStart == UInt64(state.nextRow), shard.rowEnd <= UInt64(expected.rows.upperBound),
              shard.colStart == UInt64(expected.cols.lowerBound), shard.cols == UInt64(expected.cols.count) else {
            return .violation(.badData, "layer '\(layer.name)': shard rows \(shard.rowStart)..<\(shard.rowEnd), columns \(shard.colStart)..<\(shard.colEnd); expected rows from \(state.nextRow) within \(expected.rows.upperBound), columns \(expected.cols.lowerBound)..<\(expected.cols.upperBound) (part \(state.rectangle + 1) of \(plan.count) the worker announced)")
        }
        guard shard.dtype == payloadDType else {
            return .violation(.badData, "shard dtype \(shard.dtype), the job sends \(payloadDType)")
        }
        return .accept(InFlight(worker: worker, attempt: attempt, rowStart: Int(shard.rowStart), rows: Int(shard.rowCount),
                                colStart: Int(shard.colStart), cols: Int(shard.cols), checksum: shard.checksum))
    }

    private func describe(_ plan: [LayerRegion]) -> String {
        plan.prefix(4).map(\.description).joined(separator: "; ") + (plan.count > 4 ? "; … (\(plan.count) rectangles)" : "")
    }

    /// The first rows of an accepted shard are about to be folded in.
    mutating func markDirty(_ worker: String) {
        dirty.insert(worker)
    }

    /// An accepted shard arrived whole and intact: it counts toward the worker's commit.
    /// Returns false when it belongs to an attempt that is no longer current.
    mutating func shardCompleted(_ shard: InFlight) -> Bool {
        guard shard.attempt == attempt, !committed.contains(shard.worker) else { return false }
        let plan = plan(of: shard.worker)
        var state = progress[shard.worker] ?? Progress(plan: plan)
        state.nextRow += shard.rows
        state.rows += shard.rows
        if state.rectangle < plan.count, state.nextRow >= plan[state.rectangle].rows.upperBound {
            state.rectangle += 1
            if state.rectangle < plan.count { state.nextRow = plan[state.rectangle].rows.lowerBound }
        }
        state.shards += 1
        state.checksum.addShard(shard.checksum)
        progress[shard.worker] = state
        return true
    }

    enum CommitResult: Equatable {
        case counted
        /// Stale attempt or a second commit: already accounted for.
        case ignored
        case mismatch(String)
    }

    /// A worker's commit, verified against what arrived.
    mutating func commit(_ message: LayerCommit, from worker: String) -> CommitResult {
        guard message.attempt == attempt, !committed.contains(worker) else { return .ignored }
        let plan = plan(of: worker)
        let state = progress[worker] ?? Progress(plan: plan)
        let owedRows = plan.reduce(0) { $0 + $1.rows.count }
        guard state.rectangle == plan.count, message.rowCount == UInt64(state.rows),
              message.shardCount == state.shards, message.checksum == state.checksum.value else {
            return .mismatch("layer '\(layer.name)': the commit (\(message.rowCount) rows, \(message.shardCount) shards) does not match what arrived (\(state.rows) of the \(owedRows) rows of its \(plan.count) announced part\(plan.count == 1 ? "" : "s"), \(state.shards) shards, checksum \(message.checksum == state.checksum.value ? "equal" : "different")); reconnect to resend")
        }
        committed.insert(worker)
        return .counted
    }

    var isComplete: Bool { committed == holders }

    // MARK: Power rounds

    mutating func setPowerRequest(_ request: PowerRequest, workers: Set<String>) {
        powerRequest = request
        powerPending = workers
    }

    /// Whether a reply for `round` from `worker` is the one this round waits for.
    func expectsReply(round: UInt32, from worker: String) -> Bool? {
        guard let request = powerRequest else { return false }
        guard round == request.round else { return round < request.round ? false : nil }
        return powerPending.contains(worker)
    }

    /// Records a stored reply; true when nobody owes one any more.
    mutating func replyStored(from worker: String) -> Bool {
        powerPending.remove(worker)
        return powerPending.isEmpty
    }

    /// What `worker` still owes this layer, for a stall warning; nil when nothing.
    func owed(by worker: String, power: Bool) -> String? {
        guard holders.contains(worker) else { return nil }
        if power {
            guard let request = powerRequest, powerPending.contains(worker) else { return nil }
            return "its reply to power round \(request.round) of layer '\(layer.name)'"
        }
        guard !committed.contains(worker) else { return nil }
        let plan = plan(of: worker)
        let state = progress[worker] ?? Progress(plan: plan)
        guard state.rectangle < plan.count else { return "its commit of layer '\(layer.name)' (attempt \(attempt))" }
        let part = plan[state.rectangle]
        let columns = part.cols == 0..<layer.cols ? "" : ", columns \(part.cols.lowerBound)..<\(part.cols.upperBound)"
        let more = plan.count - state.rectangle - 1
        return "rows \(state.nextRow)..<\(part.rows.upperBound)\(columns)\(more > 0 ? " and \(more) more part\(more == 1 ? "" : "s")" : "") of layer '\(layer.name)' (attempt \(attempt)) and its commit"
    }
}
