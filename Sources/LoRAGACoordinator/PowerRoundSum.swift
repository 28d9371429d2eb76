import LoRAGACore

/// One power round's replies, summed in worker-id order as they arrive.
///
/// The same inputs must give the same bits whoever answers first, so replies are added in a
/// fixed order (the holders' ids, sorted). A reply is added as soon as every reply before it
/// in that order is in; only one that arrives early waits, and it waits compact (its spans'
/// rows, as it travelled), so the coordinator's memory is one product matrix plus early
/// arrivals rather than one full-size matrix per worker.
struct PowerRoundSum {
    /// Worker ids in the order their replies are added.
    let order: [String]
    let rows: Int
    let cols: Int
    /// The sum of the replies of `order[..<added]`.
    private(set) var sum: Matrix
    private(set) var added = 0
    /// Replies that arrived before a predecessor in `order`: their spans and those rows' values.
    private(set) var waiting: [String: (spans: [Range<Int>], values: [Float])] = [:]

    init(holders: some Collection<String>, rows: Int, cols: Int) {
        order = holders.sorted()
        self.rows = rows
        self.cols = cols
        sum = Matrix(rows: rows, cols: cols)
    }

    /// Every reply is in.
    var isComplete: Bool { added == order.count }

    /// Floats held by replies waiting for a predecessor.
    var waitingFloats: Int { waiting.values.reduce(0) { $0 + $1.values.count } }

    /// Takes `worker`'s reply: `values` holds the rows of `spans` (sorted, disjoint, within
    /// `rows`), `cols` floats each, row-major, as the reply carried them.
    mutating func add(_ worker: String, spans: [Range<Int>], values: [Float]) {
        precondition(values.count == spans.reduce(0) { $0 + $1.count } * cols, "reply of \(values.count) floats for spans \(spans)")
        guard added < order.count, order[added] == worker else {
            precondition(order[added...].contains(worker), "'\(worker)' holds no reply of this round")
            waiting[worker] = (spans, values)
            return
        }
        accumulate(spans: spans, values: values)
        added += 1
        while added < order.count, let next = waiting.removeValue(forKey: order[added]) {
            accumulate(spans: next.spans, values: next.values)
            added += 1
        }
    }

    private mutating func accumulate(spans: [Range<Int>], values: [Float]) {
        let cols = cols
        sum.storage.withUnsafeMutableBufferPointer { target in
            values.withUnsafeBufferPointer { source in
                var offset = 0
                for span in spans {
                    let base = span.lowerBound * cols
                    for i in 0..<(span.count * cols) { target[base + i] += source[offset + i] }
                    offset += span.count * cols
                }
            }
        }
    }
}
