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

    @Test("a finished sum is reused in place, zeroed, and gives the same factors as fresh memory")
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
}
