/// A dense Float32 matrix stored row-major, the layout PyTorch and safetensors use
/// for a weight [out, in], so a row block of a gradient is one contiguous slice.
public struct Matrix: Sendable, Equatable {
    public let rows: Int
    public let cols: Int
    /// Row-major: element (i, j) lives at `storage[i * cols + j]`.
    public var storage: [Float]

    public init(rows: Int, cols: Int) {
        precondition(rows >= 0 && cols >= 0, "negative matrix shape \(rows)×\(cols)")
        self.rows = rows
        self.cols = cols
        self.storage = rows * cols * 4 >= ZeroedFloats.prefaultBytes
            ? ZeroedFloats.prefaulted(count: rows * cols)
            : [Float](repeating: 0, count: rows * cols)
    }

    /// A matrix whose elements hold whatever its memory held, its pages not touched: for a
    /// caller that writes every element before reading it (a dense layer's sum), which then
    /// skips zeroing it and maps its pages as it writes them (`LayerAccumulator`).
    public static func unspecified(rows: Int, cols: Int) -> Matrix {
        precondition(rows >= 0 && cols >= 0, "negative matrix shape \(rows)×\(cols)")
        let count = rows * cols
        // Float is trivial: any bit pattern is a valid value.
        return Matrix(rows: rows, cols: cols, storage: [Float](unsafeUninitializedCapacity: count) { _, initialized in initialized = count })
    }

    public init(rows: Int, cols: Int, storage: [Float]) {
        precondition(storage.count == rows * cols, "storage holds \(storage.count) values, shape \(rows)×\(cols) needs \(rows * cols)")
        self.rows = rows
        self.cols = cols
        self.storage = storage
    }

    public subscript(row: Int, col: Int) -> Float {
        get { storage[row * cols + col] }
        set { storage[row * cols + col] = newValue }
    }

    public var isEmpty: Bool { rows == 0 || cols == 0 }

    public func transposed() -> Matrix {
        var result = Matrix(rows: cols, cols: rows)
        storage.withUnsafeBufferPointer { source in
            result.storage.withUnsafeMutableBufferPointer { target in
                // Tiled so both sides stay in cache on large matrices.
                let tile = 32
                for rowStart in stride(from: 0, to: rows, by: tile) {
                    for colStart in stride(from: 0, to: cols, by: tile) {
                        for i in rowStart..<min(rowStart + tile, rows) {
                            for j in colStart..<min(colStart + tile, cols) {
                                target[j * rows + i] = source[i * cols + j]
                            }
                        }
                    }
                }
            }
        }
        return result
    }

    /// Copy of the columns `range` (all rows).
    public func columns(_ range: Range<Int>) -> Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= cols, "columns \(range) outside 0..<\(cols)")
        var result = Matrix(rows: rows, cols: range.count)
        for i in 0..<rows {
            for (k, j) in range.enumerated() {
                result.storage[i * range.count + k] = storage[i * cols + j]
            }
        }
        return result
    }

    /// Copy of the rows `range` (all columns).
    public func rows(_ range: Range<Int>) -> Matrix {
        precondition(range.lowerBound >= 0 && range.upperBound <= rows, "rows \(range) outside 0..<\(rows)")
        return Matrix(rows: range.count, cols: cols, storage: Array(storage[(range.lowerBound * cols)..<(range.upperBound * cols)]))
    }

    public mutating func scale(by factor: Float) {
        storage.withUnsafeMutableBufferPointer { values in
            for index in values.indices { values[index] *= factor }
        }
    }

    /// Multiplies row i by `factors[i]` (diag(factors) · self).
    public mutating func scaleRows(by factors: [Float]) {
        precondition(factors.count == rows, "\(factors.count) factors for \(rows) rows")
        for i in 0..<rows {
            for j in 0..<cols { storage[i * cols + j] *= factors[i] }
        }
    }

    /// Multiplies column j by `factors[j]` (self · diag(factors)).
    public mutating func scaleColumns(by factors: [Float]) {
        precondition(factors.count == cols, "\(factors.count) factors for \(cols) columns")
        for i in 0..<rows {
            for j in 0..<cols { storage[i * cols + j] *= factors[j] }
        }
    }

    /// Squared Frobenius norm, accumulated in Double so large matrices lose nothing.
    public var frobeniusNormSquared: Double {
        storage.withUnsafeBufferPointer { RowBlock.sumOfSquares($0) }
    }

    public static func identity(_ size: Int) -> Matrix {
        var result = Matrix(rows: size, cols: size)
        for i in 0..<size { result[i, i] = 1 }
        return result
    }
}

/// A borrowed row block of a larger row-major matrix: rows `rowStart ..< rowStart + rowCount`.
/// This is the unit in which gradients stream (from files, over the wire) into sketches.
public struct RowBlock {
    public let rowStart: Int
    public let rowCount: Int
    public let cols: Int
    public let values: UnsafeBufferPointer<Float>

    public init(rowStart: Int, rowCount: Int, cols: Int, values: UnsafeBufferPointer<Float>) {
        precondition(values.count == rowCount * cols, "row block holds \(values.count) values, \(rowCount)×\(cols) needs \(rowCount * cols)")
        self.rowStart = rowStart
        self.rowCount = rowCount
        self.cols = cols
        self.values = values
    }

    public var rowRange: Range<Int> { rowStart..<(rowStart + rowCount) }

    /// Σ x² in Double; four partial sums keep the loop vectorizable.
    static func sumOfSquares(_ values: UnsafeBufferPointer<Float>) -> Double {
        // Sixteen lanes of partial sums: a single running Float sum is one long dependency
        // chain that the compiler may not reorder (profiled at ~4 cycles per element).
        guard let base = values.baseAddress else { return 0 }
        let raw = UnsafeRawPointer(base)
        let lanes = 16
        let chunk = 4096
        var total: Double = 0
        var start = 0
        while start < values.count {
            let end = min(start + chunk, values.count)
            var vector = SIMD16<Float>()
            var index = start
            while index + lanes <= end {
                Prefetch.read(raw + index * 4 + Prefetch.distance)
                let v = raw.loadUnaligned(fromByteOffset: index * 4, as: SIMD16<Float>.self)
                vector += v * v
                index += lanes
            }
            var partial = vector.sum()
            while index < end {
                partial += values[index] * values[index]
                index += 1
            }
            total += Double(partial)
            start = end
        }
        return total
    }

    public var frobeniusNormSquared: Double { RowBlock.sumOfSquares(values) }

    /// The index of the first value that is NaN or infinite, if any.
    public func firstNonFiniteIndex() -> Int? {
        guard let base = values.baseAddress, FloatKernels.containsNonFinite(base, count: values.count) else { return nil }
        return values.firstIndex { !$0.isFinite }
    }
}

extension RowBlock {
    /// Rows per block for the products G_b·P and Gᵀ_b·Y_b with k = `productWidth` columns.
    /// Every block call re-reads the cols × k operands (BLAS packs P; Z = Σ Gᵀ_b Y_b is read
    /// and written), so their traffic per block row is k/rows of the block's own. While they
    /// stay in the last-level cache (cols·k floats ≤ 8 MiB of its 32) that traffic is cheap
    /// and small blocks cost nothing; beyond it they stream from memory and bigger blocks pay.
    /// Measured with `lora-ga init` (2-core EPYC, 1 OpenBLAS thread, power mode):
    ///
    /// | layer, r (k)            | 64 rows        | 128 rows        | 256 rows        |
    /// |-------------------------|----------------|-----------------|-----------------|
    /// | 4096×11008, r=32 (112)  | 0.82 s, 55 MB  | 0.83 s, 61 MB   | 0.80 s, 72 MB   |
    /// | 8192×28672, r=8 (32)    | 1.33 s, 56 MB  | 1.42 s, 70 MB   | 1.37 s, 101 MB  |
    /// | 8192×28672, r=32 (112)  | 3.95 s, 97 MB  | 3.70 s, 111 MB  | 3.48 s, 140 MB  |
    ///
    /// (two workers on 8192×28672 r=32: 5.73 s at 128 rows, 5.16 s at 256). Where blocks are
    /// read from files, two are live at once (one in use, one being read): 2·4·cols bytes a row.
    /// Sketch mode asks for `SingleViewSketch.minimumBlockRows` (256): its co-range product
    /// Υ_b G_b has the block's rows as inner dimension (4096×11008 r=8: 1.07 s at 64 rows,
    /// 0.99 s at 128); its k is that of Ω and Ξᵀ together, both packed for every block
    /// (`SingleViewSketch.blockProductWidth`). On the 2-core Xeon, the fold's three products
    /// on 4096² at k = 160 (r = 8) in C against OpenBLAS, three runs: 70.7–78.2 GFLOP/s at 64
    /// rows, 73.4–83.6 at 128, 77.8–88.8 at 256, 79.9–90.8 at 512; `lora-ga init --mode sketch`
    /// on 4096² r=8, 10 alternating runs each: 0.263 s in its GEMMs at 256 rows, 0.291 s at 128.
    /// 4096×11008 r=8 took 256 rows already (8 alternating runs: GEMM time median 0.69 s
    /// against 0.76 s at 128).
    public static func rowsPerProductBlock(cols: Int, productWidth k: Int, minimumRows: Int = 64) -> Int {
        let operandBytes = 4 * cols * Swift.max(1, k)
        let rows = operandBytes <= 8 << 20 ? minimumRows : Swift.max(minimumRows, 256)
        // Never more than 32 MB a block, however wide the layer.
        return Swift.max(1, Swift.min(rows, (32 << 20) / Swift.max(1, 4 * cols)))
    }
}
