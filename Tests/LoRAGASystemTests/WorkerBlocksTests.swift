import Foundation
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
@testable import LoRAGAWorker

/// A worker holding blocks of a layer answers power requests from its blocks only and says
/// which rows and columns it covers.
@Suite struct WorkerBlocksTests {
    func expectClose(_ a: Matrix, _ b: Matrix, _ label: String) {
        let scale = b.storage.map(abs).max() ?? 1
        let worst = zip(a.storage, b.storage).map { abs($0 - $1) }.max() ?? .infinity
        #expect(a.rows == b.rows && a.cols == b.cols && worst <= 1e-4 * Swift.max(1, scale), "\(label): max difference \(worst)")
    }

    @Test func workersShareOfALayerAnswersPowerRequests() throws {
        let g = GradientBlocksTests.gradient()
        // Worker 0 holds rows 0..<100 as two overlapping column blocks; worker 1 the rest as row blocks.
        let pieces: [GradientBlocksTests.Piece] = [
            .init(rows: 0..<100, cols: 30..<150), .init(rows: 0..<100, cols: 0..<40),   // worker 0 (overlap at cols 30..<40)
            .init(rows: 100..<160, cols: 0..<150), .init(rows: 160..<200, cols: 0..<150), // worker 1
        ]
        let dirs = try GradientBlocksTests.directories(2)
        try GradientBlocksTests.writePieces(Array(pieces[0..<2]), of: g, name: "x.weight", into: [dirs[0]])
        try GradientBlocksTests.writePieces(Array(pieces[2...]), of: g, name: "x.weight", into: [dirs[1]])

        let p = TestMatrixGenerator(seed: 5, layerName: "p").matrix(rowCount: 150, width: 12, kind: .range)
        let q = TestMatrixGenerator(seed: 6, layerName: "q").matrix(rowCount: 200, width: 12, kind: .range)
        var y = Matrix(rows: 200, cols: 12), z = Matrix(rows: 150, cols: 12)
        for (index, dir) in dirs.enumerated() {
            let reader = try GradientReader(paths: [dir])
            let layer = try #require(reader.files.layers.first)
            #expect(layer.rows == 200 && layer.cols == 150)
            let coverage = reader.coverage(of: layer)
            #expect(coverage.coveredRows == (index == 0 ? [0..<100] : [100..<200]))
            #expect(coverage.coveredCols == [0..<150])
            let share = try reader.rangeProduct(with: p, layer: layer)
            for i in 0..<200 where !coverage.coveredRows.contains(where: { $0.contains(i) }) {
                #expect(share.rows(i..<(i + 1)).storage.allSatisfy { $0 == 0 })
            }
            y.add(share)
            z.add(try reader.coRangeProduct(with: q, layer: layer))
            // The wire request goes the same way.
            let reply = try reader.answer(PowerRequest(layerIndex: 0, round: 1, side: .range, matrixRows: 150, matrixCols: 12, values: p.storage), layer: layer)
            // It carries only the rows of Y the worker's rows make: half of them.
            #expect(reply.spans == coverage.coveredRows)
            #expect(reply.carriedRows == 100)
            #expect(reply.fullValues == share.storage)
        }
        expectClose(y, Matrix.product(g, p), "Y = G·P from two workers' blocks")
        expectClose(z, Matrix.product(g, q, transposeA: true), "Z = Gᵀ·Q from two workers' blocks")
    }
}
