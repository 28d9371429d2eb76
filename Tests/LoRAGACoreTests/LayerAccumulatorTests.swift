#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import LoRAGACore

/// A dense layer's sum handed from one layer to the next (the coordinator's spare sums).
@Suite struct LayerAccumulatorTests {
    let settings = JobSettings(lora: LoRAConfiguration(rank: 2, alpha: 4), mode: .dense)

    func accumulate(_ accumulator: inout LayerAccumulator, _ g: Matrix) {
        g.storage.withUnsafeBufferPointer {
            accumulator.add(RowBlock(rowStart: 0, rowCount: g.rows, cols: g.cols, values: $0))
        }
    }

    @Test("a finished sum is reused in place, not cleared, and gives the same factors as fresh memory")
    func reusedSum() throws {
        let first = try PlantedGradient(rows: 96, cols: 64, plantedRank: 32, decay: 0.8, seed: 1).rows(0..<96)
        let second = try PlantedGradient(rows: 96, cols: 64, plantedRank: 32, decay: 0.8, seed: 2).rows(0..<96)
        var used = try LayerAccumulator(name: "first", rows: 96, cols: 64, settings: settings)
        accumulate(&used, first)
        _ = try used.finish(settings: settings)
        let address = used.storageAddress
        let spare = used.takeStorage()
        #expect(used.storageAddress == nil)

        var reused = try LayerAccumulator(name: "second", rows: 96, cols: 64, settings: settings, reusing: consume spare)
        #expect(reused.storageAddress == address)
        accumulate(&reused, second)
        #expect(reused.storageAddress == address, "the first add must not copy the reused memory")
        var fresh = try LayerAccumulator(name: "second", rows: 96, cols: 64, settings: settings)
        accumulate(&fresh, second)
        let (a, b) = (try reused.finish(settings: settings), try fresh.finish(settings: settings))
        #expect(a.svd.s == b.svd.s)
        #expect(a.factors.a.storage == b.factors.a.storage && a.factors.b.storage == b.factors.b.storage)
    }

    @Test("a spare sum of another size is not used")
    func wrongSize() throws {
        var used = try LayerAccumulator(name: "first", rows: 32, cols: 16, settings: settings)
        let spare = used.takeStorage()
        let other = try LayerAccumulator(name: "second", rows: 16, cols: 16, settings: settings, reusing: spare)
        #expect(other.storageAddress != nil && other.storageAddress != spare?.withUnsafeBufferPointer { UnsafeRawPointer($0.baseAddress) })
        #expect(other.byteCount == 16 * 16 * 4)
    }

    /// A spare sum full of a previous layer's values, as the coordinator hands it over.
    func dirtySpare(rows: Int, cols: Int) throws -> [Float] {
        var used = try LayerAccumulator(name: "previous", rows: rows, cols: cols, settings: settings)
        accumulate(&used, Matrix(rows: rows, cols: cols, storage: (0..<(rows * cols)).map { Float($0 % 7) + 1e6 }))
        return used.takeStorage()!
    }

    @Test("rows arriving in any order, twice, or never sum as if the memory had been zeroed")
    func anyOrder() throws {
        let (rows, cols) = (12, 5)
        let workers = (1...2).map { w in Matrix(rows: rows, cols: cols, storage: (0..<(rows * cols)).map { Float($0 * w) * 0.25 - 3 }) }
        // Worker 1 sends rows 0..<12 in order; worker 2 sends rows 6..<9 first (ahead of every
        // row written: a gap), then 0..<3; rows 3..<6 and 9..<12 never come from it.
        let pieces: [(worker: Int, rows: Range<Int>)] = [(1, 6..<9), (0, 0..<4), (1, 0..<3), (0, 4..<10), (0, 10..<12)]
        var accumulator = try LayerAccumulator(name: "layer", rows: rows, cols: cols, settings: settings,
                                               reusing: try dirtySpare(rows: rows, cols: cols))
        var expected = [Float](repeating: 0, count: rows * cols)
        for (worker, range) in pieces {
            let values = Array(workers[worker].storage[(range.lowerBound * cols)..<(range.upperBound * cols)])
            values.withUnsafeBufferPointer { accumulator.add(RowBlock(rowStart: range.lowerBound, rowCount: range.count, cols: cols, values: $0)) }
            for (offset, value) in values.enumerated() { expected[range.lowerBound * cols + offset] += value }
        }
        _ = try accumulator.finish(settings: settings)
        #expect(accumulator.takeStorage() == expected)

        // Rows no one sent are zero, not the previous layer's values.
        var partial = try LayerAccumulator(name: "partial", rows: rows, cols: cols, settings: settings,
                                           reusing: try dirtySpare(rows: rows, cols: cols))
        let firstRows = Array(workers[0].storage[0..<(3 * cols)])
        firstRows.withUnsafeBufferPointer { partial.add(RowBlock(rowStart: 0, rowCount: 3, cols: cols, values: $0)) }
        _ = try partial.finish(settings: settings)
        #expect(partial.takeStorage() == firstRows + [Float](repeating: 0, count: (rows - 3) * cols))
    }

    @Test("Float32 rows are summed straight from unaligned bytes, and a NaN or Inf among them is found")
    func wireBytes() throws {
        let (rows, cols) = (6, 37)   // 37 columns: rows are not a multiple of the 16-lane loop
        let values = (0..<(rows * cols)).map { Float($0) * 0.5 - 20 }
        var bytes = [UInt8](repeating: 0, count: 4 * values.count + 3)
        values.withUnsafeBytes { raw in for (i, byte) in raw.enumerated() { bytes[3 + i] = byte } }
        var accumulator = try LayerAccumulator(name: "layer", rows: rows, cols: cols, settings: settings,
                                               reusing: try dirtySpare(rows: rows, cols: cols))
        let bad: [Int?] = bytes.withUnsafeBytes { raw in
            let payload = UnsafeRawBufferPointer(rebasing: raw[3...])
            return [accumulator.addDenseFloat32(rowStart: 0, bytes: UnsafeRawBufferPointer(rebasing: payload[0..<(4 * 2 * cols)])),
                    accumulator.addDenseFloat32(rowStart: 2, bytes: UnsafeRawBufferPointer(rebasing: payload[(4 * 2 * cols)...])),
                    accumulator.addDenseFloat32(rowStart: 0, bytes: UnsafeRawBufferPointer(rebasing: payload[0..<(4 * 2 * cols)]))]
        }
        #expect(bad == [nil, nil, nil])
        _ = try accumulator.finish(settings: settings)
        #expect(accumulator.takeStorage() == values.enumerated().map { $0.offset < 2 * cols ? 2 * $0.element : $0.element })

        for (position, poison) in [(0, Float.nan), (2 * cols + 35, Float.infinity), (rows * cols - 1, -Float.infinity)] {
            var poisoned = values
            poisoned[position] = poison
            var target = try LayerAccumulator(name: "layer", rows: rows, cols: cols, settings: settings)
            let found = poisoned.withUnsafeBytes { target.addDenseFloat32(rowStart: 0, bytes: $0) }
            #expect(found == position, "\(poison) at \(position)")
        }
    }

    #if os(Linux)
    @Test("a fresh sum maps its pages a few MB ahead of the rows written, not all when it is made")
    func pagesMappedAhead() throws {
        let (rows, cols) = (2048, 8192)   // 64 MB
        var accumulator = try LayerAccumulator(name: "big", rows: rows, cols: cols, settings: settings)
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let base = Int(bitPattern: accumulator.storageAddress!)
        /// How many whole pages of the sum's bytes [from, to) are in memory, of how many.
        func resident(_ from: Int, _ to: Int) -> (mapped: Int, of: Int) {
            let start = (base + from + page - 1) / page * page
            let end = (base + to) / page * page
            var flags = [UInt8](repeating: 0, count: (end - start) / page)
            #expect(mincore(UnsafeMutableRawPointer(bitPattern: start), end - start, &flags) == 0)
            return (flags.count { $0 & 1 == 1 }, flags.count)
        }
        let (ahead, rowBytes) = (LayerAccumulator.populateBytes, 4 * cols)
        #expect(resident(0, rows * rowBytes).mapped == 0, "nothing is mapped before the first rows arrive")

        let block = [Float](repeating: 1, count: 64 * cols)   // 2 MB of rows
        block.withUnsafeBufferPointer { accumulator.add(RowBlock(rowStart: 0, rowCount: 64, cols: cols, values: $0)) }
        let near = resident(0, ahead)
        #expect(near.mapped == near.of, "the rows written and the next \(ahead) bytes are mapped")
        #expect(resident(ahead + page, rows * rowBytes).mapped == 0, "nothing further")

        // A block past the mapped rows (after a gap, which is zeroed) maps everything up to its end.
        let farStart = 1024
        block.withUnsafeBufferPointer { accumulator.add(RowBlock(rowStart: farStart, rowCount: 64, cols: cols, values: $0)) }
        let upToFar = resident(0, (farStart + 64) * rowBytes)
        #expect(upToFar.mapped == upToFar.of)
        #expect(resident((farStart + 64) * rowBytes + page, rows * rowBytes).mapped == 0)
        let (_, svd, _) = try accumulator.finish(settings: settings)
        #expect(abs(svd.s[0] - Float((128.0 * Double(cols)).squareRoot())) < 1e-2 * svd.s[0], "two blocks of ones: one singular value √(128·cols)")
    }
    #endif
}
