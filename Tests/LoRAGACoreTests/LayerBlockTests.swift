import Testing
@testable import LoRAGACore

/// Block-wise power products (DESIGN.md §2b) against dense products of the summed layer, and
/// coverage as the union of the blocks' rectangles.
@Suite struct LayerBlockTests {
    func gaussian(_ rows: Int, _ cols: Int, seed: UInt64) -> Matrix {
        TestMatrixGenerator(seed: seed, layerName: "blocks").matrix(rowCount: rows, width: cols, kind: .range)
    }

    /// Row shards, column shards, a 2-D block, an overlap and a whole layer of a 30×20 layer.
    var mixedBlocks: InMemoryLayerBlocks {
        InMemoryLayerBlocks(rows: 30, cols: 20, blocks: [
            (0, 0, gaussian(12, 20, seed: 1)),    // row shard
            (12, 0, gaussian(18, 7, seed: 2)),    // column shards of the rest
            (12, 7, gaussian(18, 13, seed: 3)),
            (5, 4, gaussian(10, 9, seed: 4)),     // 2-D block overlapping three of them
            (0, 0, gaussian(30, 20, seed: 5)),    // a whole layer on top
        ])
    }

    func expectClose(_ a: Matrix, _ b: Matrix, tolerance: Float = 1e-4) {
        #expect(a.rows == b.rows && a.cols == b.cols)
        let scale = b.storage.map(abs).max() ?? 1
        let worst = zip(a.storage, b.storage).map { abs($0 - $1) }.max() ?? 0
        #expect(worst <= tolerance * Swift.max(1, scale), "max difference \(worst)")
    }

    @Test func blockProductsEqualDenseProductsOfTheSum() throws {
        var source = mixedBlocks
        let g = source.summed()
        let p = gaussian(20, 6, seed: 9), q = gaussian(30, 6, seed: 10)
        expectClose(try source.blockProduct(with: p), Matrix.product(g, p))
        expectClose(try source.blockTransposedProduct(with: q), Matrix.product(g, q, transposeA: true))
    }

    @Test func aBlockTouchesOnlyItsRowsAndColumns() throws {
        // One 2-D block: Y is zero outside its rows, Z outside its columns.
        var source = InMemoryLayerBlocks(rows: 16, cols: 12, blocks: [(4, 3, gaussian(5, 6, seed: 3))])
        let y = try source.blockProduct(with: gaussian(12, 4, seed: 1))
        let z = try source.blockTransposedProduct(with: gaussian(16, 4, seed: 2))
        for i in 0..<16 where !(4..<9).contains(i) { for j in 0..<4 { #expect(y[i, j] == 0) } }
        for i in 0..<12 where !(3..<9).contains(i) { for j in 0..<4 { #expect(z[i, j] == 0) } }
        expectClose(y, Matrix.product(source.summed(), gaussian(12, 4, seed: 1)))
    }

    @Test func partialResultsAtAnOffsetMatchTheFullOnes() {
        // A worker may keep only its rows of Y: the same product written at an offset.
        let values = gaussian(5, 6, seed: 3), p = gaussian(12, 4, seed: 1), q = gaussian(16, 4, seed: 2)
        var fullY = Matrix(rows: 16, cols: 4), partY = Matrix(rows: 5, cols: 4)
        var fullZ = Matrix(rows: 12, cols: 4), partZ = Matrix(rows: 6, cols: 4)
        values.storage.withUnsafeBufferPointer { buffer in
            let block = LayerBlock(region: LayerRegion(rows: 4..<9, cols: 3..<9), values: buffer)
            Matrix.accumulateRangeProduct(of: block, p, into: &fullY)
            Matrix.accumulateRangeProduct(of: block, p, into: &partY, yRowOffset: 4)
            Matrix.accumulateCoRangeProduct(of: block, q, into: &fullZ)
            Matrix.accumulateCoRangeProduct(of: block, q, into: &partZ, zRowOffset: 3)
        }
        expectClose(fullY.rows(4..<9), partY, tolerance: 1e-6)
        expectClose(fullZ.rows(3..<9), partZ, tolerance: 1e-6)
    }

    @Test func coverageOfCompleteAndOverlappingBlocks() {
        let coverage = LayerCoverage(rows: 30, cols: 20, regions: mixedBlocks.blocks.dropLast().map {
            LayerRegion(rows: $0.rowStart..<($0.rowStart + $0.values.rows), cols: $0.colStart..<($0.colStart + $0.values.cols))
        })
        #expect(coverage.isComplete)
        #expect(coverage.coveredRows == [0..<30] && coverage.coveredCols == [0..<20])
    }

    @Test func uncoveredEntriesAreReportedAsRectangles() {
        // Rows 0..<10 whole; rows 10..<20 only columns 0..<8 and 12..<16; rows 20..<25 nothing.
        let coverage = LayerCoverage(rows: 25, cols: 16, regions: [
            LayerRegion(rows: 0..<10, cols: 0..<16),
            LayerRegion(rows: 10..<20, cols: 0..<8),
            LayerRegion(rows: 10..<15, cols: 12..<16),
            LayerRegion(rows: 15..<20, cols: 12..<16),
        ])
        #expect(!coverage.isComplete)
        #expect(coverage.uncovered == [
            LayerRegion(rows: 10..<20, cols: 8..<12),
            LayerRegion(rows: 20..<25, cols: 0..<16),
        ])
        #expect(coverage.coveredRows == [0..<20])
        #expect(coverage.describeUncovered().contains("rows 10..<20, cols 8..<12"))
        #expect(coverage.describeUncovered().contains("120 of 400 entries"))
    }

    @Test func rowsTouchedAreNotRowsCovered() {
        // Two column shards of different heights: every row and column is touched by some
        // block, yet the entries below the shorter one are not covered.
        let coverage = LayerCoverage(rows: 8, cols: 6, regions: [
            LayerRegion(rows: 0..<8, cols: 0..<3),
            LayerRegion(rows: 0..<5, cols: 3..<6),
        ])
        #expect(coverage.coveredRows == [0..<8] && coverage.coveredCols == [0..<6])
        #expect(coverage.uncovered == [LayerRegion(rows: 5..<8, cols: 3..<6)])
    }
}
