import Testing
@testable import LoRAGACore

/// A block added at its offset (rows and a column window) gives what full rows give: the
/// dense sum and all three sketches of Tropp et al. are linear in G.
@Suite struct BlockFoldTests {
    let rows = 96
    let cols = 80

    func g() -> Matrix { TestMatrixGenerator(seed: 21, layerName: "g").matrix(rowCount: rows, width: cols, kind: .range) }

    /// G cut into a 2-D grid of blocks (uneven), each block's values row-major.
    func blocks(of g: Matrix) -> [(LayerRegion, [Float])] {
        var result: [(LayerRegion, [Float])] = []
        for rowRange in [0..<37, 37..<96] {
            for colRange in [0..<11, 11..<50, 50..<80] {
                var values: [Float] = []
                for i in rowRange { for j in colRange { values.append(g[i, j]) } }
                result.append((LayerRegion(rows: rowRange, cols: colRange), values))
            }
        }
        return result
    }

    func expectClose(_ a: Matrix, _ b: Matrix, _ label: String) {
        let scale = b.storage.map(abs).max() ?? 1
        let worst = zip(a.storage, b.storage).map { abs($0 - $1) }.max() ?? .infinity
        #expect(a.rows == b.rows && a.cols == b.cols && worst <= 1e-4 * Swift.max(1, scale), "\(label): max difference \(worst)")
    }

    @Test func sketchOfBlocksEqualsSketchOfRows() throws {
        let g = g()
        var whole = try SingleViewSketch(rows: rows, cols: cols, targetRank: 4, width: 12, seed: 3, layerName: "l")
        var cut = whole
        g.storage.withUnsafeBufferPointer { whole.fold(RowBlock(rowStart: 0, rowCount: rows, cols: cols, values: $0)) }
        for (region, values) in blocks(of: g) {
            values.withUnsafeBufferPointer { cut.fold(LayerBlock(region: region, values: $0)) }
        }
        expectClose(cut.y, whole.y, "Y")
        expectClose(cut.x, whole.x, "X")
        expectClose(cut.z, whole.z, "Z")
    }

    @Test func denseSumOfBlocksInAnyOrderEqualsTheLayer() throws {
        let g = g()
        let settings = JobSettings(lora: LoRAConfiguration(rank: 2, alpha: 4), mode: .dense)
        var accumulator = try LayerAccumulator(name: "l", rows: rows, cols: cols, settings: settings)
        // Bottom blocks first (rows above them are not yet written), then the top ones; one
        // block twice, its second copy subtracted again by a negated copy.
        let parts = blocks(of: g)
        for (region, values) in parts.reversed() {
            values.withUnsafeBufferPointer { accumulator.add(LayerBlock(region: region, values: $0)) }
        }
        let (region, values) = parts[1]
        let negated = values.map { -$0 }
        let bytes = negated.withUnsafeBytes { Array($0) }
        #expect(bytes.withUnsafeBytes { accumulator.addDenseFloat32(region, bytes: $0) } == nil)
        values.withUnsafeBufferPointer { accumulator.add(LayerBlock(region: region, values: $0)) }
        let storage = accumulator.takeStorage()
        let sum = try #require(storage)
        expectClose(Matrix(rows: rows, cols: cols, storage: sum), g, "dense sum")
    }

    @Test func aNonFiniteValueInABlockIsFoundAtItsIndex() throws {
        let settings = JobSettings(lora: LoRAConfiguration(rank: 2, alpha: 4), mode: .dense)
        var accumulator = try LayerAccumulator(name: "l", rows: 8, cols: 8, settings: settings)
        var values = [Float](repeating: 1, count: 6)
        values[4] = .nan
        let index = values.withUnsafeBytes { accumulator.addDenseFloat32(LayerRegion(rows: 2..<5, cols: 3..<5), bytes: $0) }
        #expect(index == 4)
    }
}
