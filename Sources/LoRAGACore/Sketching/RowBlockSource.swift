/// Anything that can hand out a gradient G [rows × cols] as consecutive row blocks:
/// a matrix in memory, several safetensors files summed block by block, …
/// Products with G are computed block by block, so G never needs to be whole.
public protocol RowBlockSource {
    var rows: Int { get }
    var cols: Int { get }
    /// Calls `body` with row blocks that together cover rows 0..<rows once, in order.
    mutating func forEachRowBlock(_ body: (RowBlock) throws -> Void) throws
}

extension RowBlockSource {
    /// G · X, one GEMM per row block.
    public mutating func product(with x: Matrix) throws -> Matrix {
        var result = Matrix(rows: rows, cols: x.cols)
        try forEachRowBlock { block in
            Matrix.accumulateProduct(block, x, into: &result, rowOffset: block.rowStart, beta: 0)
        }
        return result
    }

    /// Gᵀ · X, accumulated over row blocks: Σ_blocks G[i:j]ᵀ X[i:j].
    public mutating func transposedProduct(with x: Matrix) throws -> Matrix {
        var result = Matrix(rows: cols, cols: x.cols)
        try forEachRowBlock { block in
            Matrix.accumulateBlockTransposedProduct(block, x, into: &result)
        }
        return result
    }

    /// Y = G · X and Z = Gᵀ · Y in one pass: each row block is used twice while it is at hand.
    public mutating func gramProduct(with x: Matrix) throws -> (y: Matrix, z: Matrix) {
        var y = Matrix(rows: rows, cols: x.cols)
        var z = Matrix(rows: cols, cols: x.cols)
        try forEachRowBlock { block in
            Matrix.accumulateProduct(block, x, into: &y, rowOffset: block.rowStart, beta: 0)
            Matrix.accumulateBlockTransposedProduct(block, y, into: &z)
        }
        return (y, z)
    }

    /// Answers one request of a `RangeFinder`.
    public mutating func answer(_ request: RangeFinder.Request) throws -> RangeFinder.Product {
        switch request {
        case .range(let x): return .single(try product(with: x))
        case .coRange(let x): return .single(try transposedProduct(with: x))
        case .gram(let x):
            let (y, z) = try gramProduct(with: x)
            return .gram(y: y, z: z)
        }
    }
}

/// A matrix held in memory, handed out in blocks of `blockRows` rows (all at once by default:
/// one large GEMM runs closest to the BLAS peak).
public struct InMemoryRowBlocks: RowBlockSource {
    public let matrix: Matrix
    public let blockRows: Int

    public init(_ matrix: Matrix, blockRows: Int? = nil) {
        self.matrix = matrix
        self.blockRows = Swift.max(1, blockRows ?? matrix.rows)
    }

    public var rows: Int { matrix.rows }
    public var cols: Int { matrix.cols }

    public func forEachRowBlock(_ body: (RowBlock) throws -> Void) throws {
        try matrix.storage.withUnsafeBufferPointer { values in
            var start = 0
            while start < matrix.rows {
                let count = Swift.min(blockRows, matrix.rows - start)
                let slice = UnsafeBufferPointer(rebasing: values[(start * matrix.cols)..<((start + count) * matrix.cols)])
                try body(RowBlock(rowStart: start, rowCount: count, cols: matrix.cols, values: slice))
                start += count
            }
        }
    }
}

/// Runs a `RangeFinder` to completion against a local source (dense and single-process power).
public func randomizedSVD<Source: RowBlockSource>(
    of source: inout Source, parameters: RandomizedSVDParameters, layerName: String,
    progress: ((_ pass: Int, _ of: Int) -> Void)? = nil
) throws -> TruncatedSVD {
    // One process holds all of G here, so pairs of passes fuse into one read.
    var finder = try RangeFinder(rows: source.rows, cols: source.cols, parameters: parameters, layerName: layerName, fusesPairs: true)
    var step = finder.start()
    while true {
        switch step {
        case .finished(let result):
            return result
        case .need(let request):
            let product = try source.answer(request)
            progress?(finder.passesDone, parameters.passes)
            step = try finder.advance(with: product)
        }
    }
}
