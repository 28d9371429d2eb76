import LoRAGACore
import NIOCore

/// One power round's replies, summed in worker-id order as they arrive.
///
/// The same inputs must give the same bits whoever answers first, so replies are added in a
/// fixed order (the holders' ids, sorted). A reply is added as soon as every reply before it
/// in that order is in, straight from the bytes it travelled in (no copy); only one that
/// arrives early waits, and it waits as it travelled (its spans' rows), so the coordinator's
/// memory is one product matrix plus early arrivals rather than one full-size matrix per worker.
struct PowerRoundSum {
    /// Worker ids in the order their replies are added.
    let order: [String]
    let rows: Int
    let cols: Int
    /// The sum of the replies of `order[..<added]`.
    private(set) var sum: Matrix
    private(set) var added = 0
    /// Replies that arrived before a predecessor in `order`: their spans and those rows' values
    /// (F32 little-endian, as on the wire).
    private(set) var waiting: [String: (spans: [Range<Int>], payload: ByteBuffer)] = [:]

    init(holders: some Collection<String>, rows: Int, cols: Int) {
        order = holders.sorted()
        self.rows = rows
        self.cols = cols
        sum = Matrix(rows: rows, cols: cols)
    }

    /// Every reply is in.
    var isComplete: Bool { added == order.count }

    /// Floats held by replies waiting for a predecessor.
    var waitingFloats: Int { waiting.values.reduce(0) { $0 + $1.payload.readableBytes / 4 } }

    /// Takes `worker`'s reply: `payload` holds the rows of `spans` (sorted, disjoint, within
    /// `rows`), `cols` floats each, row-major, F32 little-endian, as the reply carried them.
    mutating func add(_ worker: String, spans: [Range<Int>], payload: ByteBuffer) {
        precondition(payload.readableBytes == 4 * spans.reduce(0) { $0 + $1.count } * cols, "reply of \(payload.readableBytes) bytes for spans \(spans)")
        guard added < order.count, order[added] == worker else {
            precondition(order[added...].contains(worker), "'\(worker)' holds no reply of this round")
            waiting[worker] = (spans, payload)
            return
        }
        accumulate(spans: spans, payload: payload)
        added += 1
        while added < order.count, let next = waiting.removeValue(forKey: order[added]) {
            accumulate(spans: next.spans, payload: next.payload)
            added += 1
        }
    }

    private mutating func accumulate(spans: [Range<Int>], payload: ByteBuffer) {
        let cols = cols
        sum.storage.withUnsafeMutableBufferPointer { target in
            payload.withUnsafeReadableBytes { source in
                var offset = 0
                for span in spans {
                    let base = span.lowerBound * cols
                    for i in 0..<(span.count * cols) {
                        target[base + i] += Float(bitPattern: UInt32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * (offset + i), as: UInt32.self)))
                    }
                    offset += span.count * cols
                }
            }
        }
    }

    /// The index of the first float in `payload` (F32 little-endian) that is NaN or infinite.
    static func firstNonFinite(in payload: ByteBuffer) -> Int? {
        payload.withUnsafeReadableBytes { source in
            for i in 0..<(source.count / 4) where !Float(bitPattern: UInt32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))).isFinite {
                return i
            }
            return nil
        }
    }
}
