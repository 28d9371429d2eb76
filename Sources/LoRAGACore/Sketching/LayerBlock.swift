/// A rectangle of a layer's gradient G [out × in]: rows `rows`, columns `cols`.
public struct LayerRegion: Sendable, Hashable, Codable, CustomStringConvertible {
    public var rows: Range<Int>
    public var cols: Range<Int>

    public init(rows: Range<Int>, cols: Range<Int>) {
        self.rows = rows
        self.cols = cols
    }

    /// The whole of a `rows × cols` layer.
    public init(wholeOf rows: Int, _ cols: Int) {
        self.init(rows: 0..<rows, cols: 0..<cols)
    }

    public var isEmpty: Bool { rows.isEmpty || cols.isEmpty }
    public var elementCount: Int { rows.count * cols.count }

    public var description: String {
        "rows \(rows.lowerBound)..<\(rows.upperBound), cols \(cols.lowerBound)..<\(cols.upperBound)"
    }
}

/// A block G_b = G[r0:r1, c0:c1] of a layer, row-major with `region.cols.count` values per row.
/// Its embedding E_b(G_b) adds to the layer: G = Σ_b E_b(G_b).
public struct LayerBlock {
    public let region: LayerRegion
    public let values: UnsafeBufferPointer<Float>

    public init(region: LayerRegion, values: UnsafeBufferPointer<Float>) {
        precondition(values.count == region.elementCount, "block \(region) holds \(values.count) values, needs \(region.elementCount)")
        self.region = region
        self.values = values
    }

    /// A full-width row block seen as a block of a layer with `cols` columns.
    public init(_ block: RowBlock) {
        self.init(region: LayerRegion(rows: block.rowRange, cols: 0..<block.cols), values: block.values)
    }
}

extension Matrix {
    /// Y[r0:r1, :] += G_b · P[c0:c1, :] (range pass): only the block's rows of Y
    /// and only its columns' rows of P take part, so a block of 1/N of a layer costs 1/N.
    /// `y` holds rows `yRowOffset ..< yRowOffset + y.rows` of the layer's Y (all of it by default).
    public static func accumulateRangeProduct(of block: LayerBlock, _ p: Matrix, into y: inout Matrix, yRowOffset: Int = 0) {
        let region = block.region
        precondition(region.cols.upperBound <= p.rows && p.cols == y.cols
                     && region.rows.lowerBound >= yRowOffset && region.rows.upperBound - yRowOffset <= y.rows,
                     "block \(region) does not fit P \(p.rows)×\(p.cols) and Y rows \(yRowOffset)..<\(yRowOffset + y.rows)")
        guard !region.isEmpty, p.cols > 0 else { return }
        p.storage.withUnsafeBufferPointer { pValues in
            y.storage.withUnsafeMutableBufferPointer { yValues in
                BLAS.gemm(
                    transposeA: false, transposeB: false,
                    m: region.rows.count, n: p.cols, k: region.cols.count,
                    a: block.values.baseAddress!, lda: region.cols.count,
                    b: pValues.baseAddress! + region.cols.lowerBound * p.cols, ldb: p.cols,
                    beta: 1,
                    c: yValues.baseAddress! + (region.rows.lowerBound - yRowOffset) * y.cols, ldc: y.cols)
            }
        }
    }

    /// Z[c0:c1, :] += G_bᵀ · Q[r0:r1, :] (co-range pass).
    /// `z` holds rows `zRowOffset ..< zRowOffset + z.rows` of the layer's Z (all of it by default).
    public static func accumulateCoRangeProduct(of block: LayerBlock, _ q: Matrix, into z: inout Matrix, zRowOffset: Int = 0) {
        let region = block.region
        precondition(region.rows.upperBound <= q.rows && q.cols == z.cols
                     && region.cols.lowerBound >= zRowOffset && region.cols.upperBound - zRowOffset <= z.rows,
                     "block \(region) does not fit Q \(q.rows)×\(q.cols) and Z rows \(zRowOffset)..<\(zRowOffset + z.rows)")
        guard !region.isEmpty, q.cols > 0 else { return }
        q.storage.withUnsafeBufferPointer { qValues in
            z.storage.withUnsafeMutableBufferPointer { zValues in
                BLAS.gemm(
                    transposeA: true, transposeB: false,
                    m: region.cols.count, n: q.cols, k: region.rows.count,
                    a: block.values.baseAddress!, lda: region.cols.count,
                    b: qValues.baseAddress! + region.rows.lowerBound * q.cols, ldb: q.cols,
                    beta: 1,
                    c: zValues.baseAddress! + (region.cols.lowerBound - zRowOffset) * z.cols, ldc: z.cols)
            }
        }
    }
}

/// Anything that hands out a layer's gradient (or a share of it) as blocks whose embeddings
/// add up to what it holds: a worker's gradient files, a row-block source seen blockwise.
public protocol LayerBlockSource {
    var rows: Int { get }
    var cols: Int { get }
    /// Calls `body` with blocks that together add up to this source's part of G.
    mutating func forEachBlock(_ body: (LayerBlock) throws -> Void) throws
}

extension LayerBlockSource {
    /// Σ_b E_b(G_b) · P: only the blocks' rows of the result are nonzero.
    public mutating func blockProduct(with p: Matrix) throws -> Matrix {
        precondition(p.rows == cols, "P has \(p.rows) rows, the layer \(cols) columns")
        var y = Matrix(rows: rows, cols: p.cols)
        try forEachBlock { Matrix.accumulateRangeProduct(of: $0, p, into: &y) }
        return y
    }

    /// Σ_b E_b(G_b)ᵀ · Q: only the blocks' columns' rows of the result are nonzero.
    public mutating func blockTransposedProduct(with q: Matrix) throws -> Matrix {
        precondition(q.rows == rows, "Q has \(q.rows) rows, the layer \(rows) rows")
        var z = Matrix(rows: cols, cols: q.cols)
        try forEachBlock { Matrix.accumulateCoRangeProduct(of: $0, q, into: &z) }
        return z
    }
}

/// Blocks held in memory (tests, small layers): each a matrix at an offset.
public struct InMemoryLayerBlocks: LayerBlockSource {
    public let rows: Int
    public let cols: Int
    public let blocks: [(rowStart: Int, colStart: Int, values: Matrix)]

    public init(rows: Int, cols: Int, blocks: [(rowStart: Int, colStart: Int, values: Matrix)]) {
        for block in blocks {
            precondition(block.rowStart >= 0 && block.colStart >= 0 && block.rowStart + block.values.rows <= rows && block.colStart + block.values.cols <= cols,
                         "block \(block.values.rows)×\(block.values.cols) at (\(block.rowStart), \(block.colStart)) outside \(rows)×\(cols)")
        }
        self.rows = rows
        self.cols = cols
        self.blocks = blocks
    }

    public func forEachBlock(_ body: (LayerBlock) throws -> Void) throws {
        for block in blocks {
            let region = LayerRegion(rows: block.rowStart..<(block.rowStart + block.values.rows), cols: block.colStart..<(block.colStart + block.values.cols))
            try block.values.storage.withUnsafeBufferPointer { try body(LayerBlock(region: region, values: $0)) }
        }
    }

    /// The layer the blocks add up to, Σ_b E_b(G_b), held whole (tests).
    public func summed() -> Matrix {
        var g = Matrix(rows: rows, cols: cols)
        for block in blocks {
            for i in 0..<block.values.rows {
                for j in 0..<block.values.cols {
                    g[block.rowStart + i, block.colStart + j] += block.values[i, j]
                }
            }
        }
        return g
    }
}
