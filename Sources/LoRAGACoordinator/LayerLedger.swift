import LoRAGACore
import LoRAGAFormats
import LoRAGAWire

/// One open layer's exactly-once ledger, a pure value: which attempt is current, what each
/// worker has sent for it (next row, shard count, running checksum), who has committed, and,
/// in power mode, the outstanding request and who still owes an answer.
///
/// A worker's contribution counts only once its commit matches what this ledger saw arrive
/// (rows, shard count, checksum of the shard checksums in order); anything else is refused
/// and the worker resends after reconnecting.
struct LayerLedger: Sendable, Equatable {
    /// What one worker has delivered for the current attempt.
    struct Progress: Sendable, Equatable {
        var nextRow = 0
        var shards: UInt32 = 0
        var checksum = ShardChecksum()
    }

    /// A shard whose rows are arriving on some connection.
    struct InFlight: Sendable, Equatable {
        var worker: String
        var attempt: UInt32
        var rowStart: Int
        var rows: Int
        var checksum: UInt64
    }

    let index: Int
    let layer: GradientLayer
    /// The workers that hold (part of) this layer: each must commit it, or answer its rounds.
    let holders: Set<String>
    private(set) var attempt: UInt32 = 0
    private(set) var committed: Set<String> = []
    /// Workers whose data is folded into the current attempt's sum or sketch.
    private(set) var dirty: Set<String> = []
    private(set) var progress: [String: Progress] = [:]
    /// Power: the request every worker must answer, and who still owes an answer.
    private(set) var powerRequest: PowerRequest?
    private(set) var powerPending: Set<String> = []

    init(index: Int, layer: GradientLayer, holders: Set<String>) {
        self.index = index
        self.layer = layer
        self.holders = holders
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
        guard shard.cols == UInt64(layer.cols) else {
            return .violation(.shapeMismatch, "layer '\(layer.name)' has \(layer.cols) columns, the shard has \(shard.cols)")
        }
        let next = progress[worker]?.nextRow ?? 0
        guard shard.rowStart == UInt64(next), shard.rowEnd <= UInt64(layer.rows) else {
            return .violation(.badData, "layer '\(layer.name)': shard rows \(shard.rowStart)..<\(shard.rowEnd), expected rows from \(next) within \(layer.rows)")
        }
        guard shard.dtype == payloadDType else {
            return .violation(.badData, "shard dtype \(shard.dtype), the job sends \(payloadDType)")
        }
        return .accept(InFlight(worker: worker, attempt: attempt, rowStart: Int(shard.rowStart), rows: Int(shard.rowCount), checksum: shard.checksum))
    }

    /// The first rows of an accepted shard are about to be folded in.
    mutating func markDirty(_ worker: String) {
        dirty.insert(worker)
    }

    /// An accepted shard arrived whole and intact: it counts toward the worker's commit.
    /// Returns false when it belongs to an attempt that is no longer current.
    mutating func shardCompleted(_ shard: InFlight) -> Bool {
        guard shard.attempt == attempt, !committed.contains(shard.worker) else { return false }
        var state = progress[shard.worker] ?? Progress()
        state.nextRow += shard.rows
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
        let state = progress[worker] ?? Progress()
        guard state.nextRow == layer.rows, message.rowCount == UInt64(state.nextRow),
              message.shardCount == state.shards, message.checksum == state.checksum.value else {
            return .mismatch("layer '\(layer.name)': the commit (\(message.rowCount) rows, \(message.shardCount) shards) does not match what arrived (\(state.nextRow) of \(layer.rows) rows, \(state.shards) shards, checksum \(message.checksum == state.checksum.value ? "equal" : "different")); reconnect to resend")
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
        let next = progress[worker]?.nextRow ?? 0
        return "rows \(next)..<\(layer.rows) of layer '\(layer.name)' (attempt \(attempt)) and its commit"
    }
}
