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
    /// Every block call re-reads the cols × k operands, so while they fit the last-level cache
    /// (≤ 8 MiB) small blocks cost nothing and save memory; beyond it bigger blocks amortize
    /// the traffic. Sketch mode passes a larger `minimumRows`: its co-range product has the
    /// block's rows as inner dimension. Measurements: Scripts/bench-results/README.md.
    public static func rowsPerProductBlock(cols: Int, productWidth k: Int, minimumRows: Int = 64) -> Int {
        let operandBytes = 4 * cols * Swift.max(1, k)
        let rows = operandBytes <= 8 << 20 ? minimumRows : Swift.max(minimumRows, 256)
        // Never more than 32 MB a block, however wide the layer.
        return Swift.max(1, Swift.min(rows, (32 << 20) / Swift.max(1, 4 * cols)))
    }
}
