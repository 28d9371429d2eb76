import LoRAGACore
import LoRAGADaemon
import LoRAGAWire

// Power mode's side of the engine: requests out, replies summed in worker-id order as they
// arrive, the range finder advanced round by round.
extension CoordinatorEngine {
    func receivePowerReply(_ reply: PowerReply, from connection: JobStateMachine.ConnectionID) {
        let index = Int(reply.layerIndex)
        guard let worker = accepted(machine.powerReplyArrived(on: connection, layer: index, round: reply.round), on: connection),
              let layer = machine.layers?[index], let finder = work[index]?.finder else { return }
        let expectedRows = reply.side == .range ? layer.rows : layer.cols
        guard Int(reply.matrixRows) == expectedRows, Int(reply.matrixCols) == finder.sketchWidth else {
            return refuse(connection, ErrorMessage(code: .shapeMismatch, message: "layer '\(layer.name)': reply is \(reply.matrixRows)×\(reply.matrixCols), expected \(expectedRows)×\(finder.sketchWidth)"))
        }
        // A worker's reply carries the rows its share can make nonzero, exactly: fewer would
        // drop part of its product, more would be bytes it has no business sending.
        let spans = machine.replySpans(layer: index, worker: worker, side: reply.side) ?? []
        guard reply.spans == spans else {
            let describe = { (ranges: [Range<Int>]) in ranges.prefix(4).map { "\($0.lowerBound)..<\($0.upperBound)" }.joined(separator: ", ") + (ranges.count > 4 ? ", …" : "") }
            return refuse(connection, ErrorMessage(code: .shapeMismatch, message: "layer '\(layer.name)': reply carries rows \(describe(reply.spans)), the worker's share makes rows \(describe(spans))"))
        }
        // Only the rows of its spans, read where they arrived (no copy).
        if let bad = PowerRoundSum.firstNonFinite(in: reply.payload) {
            let row = Self.row(ofCompactIndex: bad / finder.sketchWidth, spans: spans)
            return perform(machine.fail(JobError(.badInput, "worker '\(worker)': layer '\(layer.name)' produced NaN/Inf in its power-iteration product (row \(row)); its gradient contains non-finite values")))
        }
        if work[index]!.round == nil {
            work[index]!.round = PowerRoundSum(holders: machine.holders(of: index) ?? [worker], rows: expectedRows, cols: finder.sketchWidth)
        }
        work[index]!.round!.add(worker, spans: spans, payload: reply.payload)
        work[index]!.bytes += reply.payload.readableBytes
        totalBytes += reply.payload.readableBytes
        options.metrics.received(bytes: reply.payload.readableBytes)
        perform(machine.powerReplyStored(layer: index, worker: worker))
    }

    /// The row of a compact reply's `index`-th carried row.
    static func row(ofCompactIndex index: Int, spans: [Range<Int>]) -> Int {
        var remaining = index
        for span in spans {
            if remaining < span.count { return span.lowerBound + remaining }
            remaining -= span.count
        }
        return index
    }

    func advancePower(_ index: Int, step: RangeFinder.Step, round: UInt32) {
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
            work[index]?.round = nil
            perform(machine.powerRequestReady(layer: index, message))
        }
    }

    func completePowerRound(_ index: Int) {
        // Summed in worker-id order as the replies came: the same inputs give the same bits.
        guard let replies = work[index]?.round, var finder = work[index]?.finder else { return }
        precondition(replies.isComplete, "power round of layer \(index) complete with \(replies.added) of \(replies.order.count) replies added")
        work[index]?.round = nil
        let round = UInt32(finder.passesDone)
        do {
            let step = try finder.advance(with: replies.sum)
            work[index]?.finder = finder
            advancePower(index, step: step, round: round)
        } catch {
            perform(machine.fail(JobError(ExitStatus.kind(of: error), "\(error)")))
        }
    }

    /// A power-mode layer: the range finder's result is the SVD; factors cost nothing.
    func finalize(_ index: Int, svd: TruncatedSVD) {
        let transferred = work[index].map { seconds(since: $0.started) } ?? 0
        let factors = LoRAFactors(svd: svd, configuration: options.settings.lora)
        // ‖Σ G_w‖ is not linear in the workers' data: `lora-ga verify` measures fidelity.
        record(index, factors: factors, svd: svd, fidelity: nil, transferred: transferred, computed: 0)
    }
}
