import Testing
@testable import LoRAGACore

@Suite struct LinearAlgebraTests {
    func gaussian(_ rows: Int, _ cols: Int, seed: UInt64 = 7) -> Matrix {   // near-normal test-matrix entries
        TestMatrixGenerator(seed: seed, layerName: "test").matrix(rowCount: rows, width: cols, kind: .range)
    }

    @Test func productMatchesNaiveLoops() {
        let a = gaussian(5, 3), b = gaussian(3, 4, seed: 8)
        let c = Matrix.product(a, b)
        for i in 0..<5 {
            for j in 0..<4 {
                var expected: Float = 0
                for k in 0..<3 { expected += a[i, k] * b[k, j] }
                #expect(abs(c[i, j] - expected) < 1e-5)
            }
        }
        let ct = Matrix.product(a, a, transposeA: true)   // 3×3 Gram
        #expect(ct.rows == 3 && ct.cols == 3)
        #expect(abs(ct[0, 1] - ct[1, 0]) < 1e-5)
    }

    @Test func orthonormalizedColumnsSpanTheInputAndAreOrthonormal() throws {
        let y = gaussian(50, 6)
        let q = try y.orthonormalizedColumns()
        let gram = Matrix.product(q, q, transposeA: true)
        for i in 0..<6 { for j in 0..<6 { #expect(abs(gram[i, j] - (i == j ? 1 : 0)) < 1e-5) } }
        // Y = Q QᵀY: projecting Y onto span(Q) changes nothing.
        let projected = Matrix.product(q, Matrix.product(q, y, transposeA: true))
        for index in y.storage.indices { #expect(abs(projected.storage[index] - y.storage[index]) < 1e-4) }
    }

    @Test func orthonormalizedColumnsOfRankDeficientInputStayOrthonormal() throws {
        var y = gaussian(40, 5)
        for i in 0..<40 { y[i, 3] = y[i, 0]; y[i, 4] = 0 }   // rank 3
        let q = try y.orthonormalizedColumns()
        let gram = Matrix.product(q, q, transposeA: true)
        for i in 0..<5 { for j in 0..<5 { #expect(abs(gram[i, j] - (i == j ? 1 : 0)) < 1e-4) } }
    }

    @Test(arguments: [(30, 12), (12, 30), (16, 16)])
    func svdReconstructsAndMatchesDoublePrecision(shape: (Int, Int)) throws {
        let a = gaussian(shape.0, shape.1)
        let svd = try a.singularValueDecomposition()
        var scaledU = svd.u
        for i in 0..<scaledU.rows { for j in 0..<scaledU.cols { scaledU[i, j] *= svd.s[j] } }
        let back = Matrix.product(scaledU, svd.vt)
        for index in a.storage.indices { #expect(abs(back.storage[index] - a.storage[index]) < 1e-4) }
        let exact = try a.exactSingularValues()
        #expect(exact.count == svd.s.count)
        for (single, double) in zip(svd.s, exact) { #expect(abs(Double(single) - double) < 1e-4 * exact[0]) }
        #expect(zip(exact, exact.dropFirst()).allSatisfy { $0 >= $1 })
    }

    @Test func leastSquaresSolvesAnOverdeterminedSystem() throws {
        let m = gaussian(20, 4)
        let truth = gaussian(4, 3, seed: 9)
        let rhs = Matrix.product(m, truth)
        let x = try m.leastSquaresSolution(rhs)
        for index in truth.storage.indices { #expect(abs(x.storage[index] - truth.storage[index]) < 1e-4) }
    }

    @Test func transposeRoundTrips() {
        let a = gaussian(37, 70)
        #expect(a.transposed().transposed() == a)
        #expect(a.transposed()[5, 3] == a[3, 5])
    }

    @Test func testMatricesDependOnRowsNotOnBlocking() {
        let generator = TestMatrixGenerator(seed: 42, layerName: "layer.weight")
        let whole = generator.matrix(rowCount: 10, width: 7, kind: .coreLeft)
        let tail = generator.rows(6..<10, width: 7, kind: .coreLeft)
        #expect(tail == whole.rows(6..<10))
        let otherLayer = TestMatrixGenerator(seed: 42, layerName: "other.weight").matrix(rowCount: 10, width: 7, kind: .coreLeft)
        #expect(otherLayer != whole)
        // Roughly standard normal.
        let big = generator.matrix(rowCount: 1000, width: 100, kind: .range).storage
        let mean = big.reduce(0, +) / Float(big.count)
        let variance = big.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Float(big.count)
        #expect(abs(mean) < 0.01 && abs(variance - 1) < 0.02)
    }

    @Test func nonFiniteValuesAreFoundInRowBlocks() {
        var values: [Float] = [1, 2, 3, 4, 5, 6]
        values.withUnsafeBufferPointer { #expect(RowBlock(rowStart: 0, rowCount: 2, cols: 3, values: $0).firstNonFiniteIndex() == nil) }
        values[4] = .nan
        values.withUnsafeBufferPointer { #expect(RowBlock(rowStart: 0, rowCount: 2, cols: 3, values: $0).firstNonFiniteIndex() == 4) }
        values[4] = 0; values[1] = -.infinity
        values.withUnsafeBufferPointer { #expect(RowBlock(rowStart: 0, rowCount: 2, cols: 3, values: $0).firstNonFiniteIndex() == 1) }
    }
}
