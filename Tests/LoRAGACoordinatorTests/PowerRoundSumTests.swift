import LoRAGAWire
import NIOCore
import Testing
@testable import LoRAGACoordinator

/// A power round's replies are summed in worker-id order whatever order they arrive in, and
/// only a reply that arrives before a predecessor waits (compact).
@Suite struct PowerRoundSumTests {
    static let rows = 6, cols = 3
    /// Three workers' replies: w0 whole, w1 rows 0..<2 and 4..<6, w2 rows 2..<4; values chosen so
    /// that float addition order shows in the bits.
    static let replies: [(worker: String, spans: [Range<Int>], values: [Float])] = [
        ("w0", [0..<6], (0..<18).map { Float($0) * 1.000_1e7 + 0.3 }),
        ("w1", [0..<2, 4..<6], (0..<12).map { 1 / Float($0 + 3) }),
        ("w2", [2..<4], (0..<6).map { -Float($0) * 0.7e7 + 1e-3 }),
    ]

    static func summed(arrival: [Int]) -> PowerRoundSum {
        var round = PowerRoundSum(holders: ["w2", "w0", "w1"], rows: rows, cols: cols)
        for i in arrival { round.add(replies[i].worker, spans: replies[i].spans, payload: ByteBuffer(float32LittleEndian: replies[i].values)) }
        return round
    }

    @Test func everyArrivalOrderGivesTheSameBits() {
        let reference = Self.summed(arrival: [0, 1, 2])
        #expect(reference.isComplete)
        for arrival in [[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            let round = Self.summed(arrival: arrival)
            #expect(round.isComplete)
            #expect(round.sum.storage.map(\.bitPattern) == reference.sum.storage.map(\.bitPattern), "\(arrival)")
        }
    }

    @Test func theSumIsEachReplyAddedAtItsRows() {
        var expected = [Float](repeating: 0, count: Self.rows * Self.cols)
        for reply in Self.replies {   // w0, w1, w2: the sorted order
            var offset = 0
            for span in reply.spans {
                for i in 0..<(span.count * Self.cols) { expected[span.lowerBound * Self.cols + i] += reply.values[offset + i] }
                offset += span.count * Self.cols
            }
        }
        #expect(Self.summed(arrival: [2, 1, 0]).sum.storage == expected)
    }

    @Test func onlyRepliesAheadOfAPredecessorWaitAndTheyWaitCompact() {
        var round = PowerRoundSum(holders: ["w0", "w1", "w2"], rows: Self.rows, cols: Self.cols)
        round.add("w0", spans: Self.replies[0].spans, payload: ByteBuffer(float32LittleEndian: Self.replies[0].values))
        #expect(round.added == 1 && round.waitingFloats == 0)
        round.add("w2", spans: Self.replies[2].spans, payload: ByteBuffer(float32LittleEndian: Self.replies[2].values))
        #expect(round.added == 1 && round.waitingFloats == 6)   // w2's two rows, not a 6-row matrix
        round.add("w1", spans: Self.replies[1].spans, payload: ByteBuffer(float32LittleEndian: Self.replies[1].values))
        #expect(round.added == 3 && round.waitingFloats == 0 && round.isComplete)
    }

    @Test func aNaNIsReportedAtItsLayerRow() {
        #expect(PowerRoundSum.firstNonFinite(in: ByteBuffer(float32LittleEndian: [1, 2, 3, 4, .nan, 6])) == 4)
        #expect(PowerRoundSum.firstNonFinite(in: ByteBuffer(float32LittleEndian: [1, -.infinity])) == 1)
        #expect(PowerRoundSum.firstNonFinite(in: ByteBuffer(float32LittleEndian: [1, 2])) == nil)
        #expect(CoordinatorEngine.row(ofCompactIndex: 0, spans: [4..<6]) == 4)
        #expect(CoordinatorEngine.row(ofCompactIndex: 3, spans: [0..<2, 4..<6]) == 5)
    }
}
