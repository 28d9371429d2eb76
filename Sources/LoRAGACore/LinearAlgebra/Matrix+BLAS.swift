import COpenBLAS
#if canImport(Glibc)
import Glibc
#endif

/// The few BLAS entry points lora-ga needs, over row-major operands.
public enum BLAS {
    /// C = alpha · op(A) · op(B) + beta · C on raw row-major storage.
    /// `a` is `aRows × aCols` as stored; op transposes it when `transposeA`.
    @inlinable
    public static func gemm(
        transposeA: Bool, transposeB: Bool,
        m: Int, n: Int, k: Int,
        alpha: Float = 1,
        a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int,
        beta: Float = 0,
        c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        guard m > 0, n > 0 else { return }
        cblas_sgemm(
            CblasRowMajor,
            transposeA ? CblasTrans : CblasNoTrans,
            transposeB ? CblasTrans : CblasNoTrans,
            blasint(m), blasint(n), blasint(k),
            alpha, a, blasint(lda), b, blasint(ldb),
            beta, c, blasint(ldc))
    }
}

extension Matrix {
    /// op(a) · op(b), the workhorse of every sketch.
    public static func product(_ a: Matrix, _ b: Matrix, transposeA: Bool = false, transposeB: Bool = false) -> Matrix {
        let m = transposeA ? a.cols : a.rows
        let k = transposeA ? a.rows : a.cols
        let kB = transposeB ? b.cols : b.rows
        let n = transposeB ? b.rows : b.cols
        precondition(k == kB, "inner dimensions differ: \(a.rows)×\(a.cols)\(transposeA ? "ᵀ" : "") · \(b.rows)×\(b.cols)\(transposeB ? "ᵀ" : "")")
        var c = Matrix(rows: m, cols: n)
        guard k > 0 else { return c }
        a.storage.withUnsafeBufferPointer { aValues in
            b.storage.withUnsafeBufferPointer { bValues in
                c.storage.withUnsafeMutableBufferPointer { cValues in
                    BLAS.gemm(
                        transposeA: transposeA, transposeB: transposeB, m: m, n: n, k: k,
                        a: aValues.baseAddress!, lda: a.cols,
                        b: bValues.baseAddress!, ldb: b.cols,
                        c: cValues.baseAddress!, ldc: n)
                }
            }
        }
        return c
    }

    /// block · x, where `block` is a streamed row block (rowCount × cols) and x is cols × k.
    public static func product(_ block: RowBlock, _ x: Matrix) -> Matrix {
        precondition(block.cols == x.rows, "row block has \(block.cols) columns, operand has \(x.rows) rows")
        var c = Matrix(rows: block.rowCount, cols: x.cols)
        accumulateProduct(block, x, into: &c, rowOffset: 0, beta: 0)
        return c
    }

    /// c[rowOffset ..< rowOffset + block.rowCount, :] = block · x + beta · (that slice).
    public static func accumulateProduct(_ block: RowBlock, _ x: Matrix, into c: inout Matrix, rowOffset: Int, beta: Float = 1) {
        precondition(c.cols == x.cols && rowOffset + block.rowCount <= c.rows, "destination too small for row block product")
        guard block.rowCount > 0, x.cols > 0 else { return }
        x.storage.withUnsafeBufferPointer { xValues in
            c.storage.withUnsafeMutableBufferPointer { cValues in
                BLAS.gemm(
                    transposeA: false, transposeB: false,
                    m: block.rowCount, n: x.cols, k: block.cols,
                    a: block.values.baseAddress!, lda: block.cols,
                    b: xValues.baseAddress!, ldb: x.cols,
                    beta: beta,
                    c: cValues.baseAddress! + rowOffset * c.cols, ldc: c.cols)
            }
        }
    }

    /// c += left[rows of block, :]ᵀ · block, i.e. the contribution of a row block to Lᵀ G
    /// where `left` is rows(G) × k. Used for co-range sketches and Gᵀ Q.
    /// `leftRowOffset` says where the block's rows start in `left` (default: the block's own rows).
    public static func accumulateTransposedProduct(_ left: Matrix, _ block: RowBlock, into c: inout Matrix, leftRowOffset: Int? = nil) {
        let offset = leftRowOffset ?? block.rowStart
        precondition(left.cols == c.rows && block.cols == c.cols && offset + block.rowCount <= left.rows,
                     "shapes disagree in Lᵀ·G accumulation")
        guard block.rowCount > 0, left.cols > 0 else { return }
        left.storage.withUnsafeBufferPointer { lValues in
            c.storage.withUnsafeMutableBufferPointer { cValues in
                BLAS.gemm(
                    transposeA: true, transposeB: false,
                    m: left.cols, n: block.cols, k: block.rowCount,
                    a: lValues.baseAddress! + offset * left.cols, lda: left.cols,
                    b: block.values.baseAddress!, ldb: block.cols,
                    beta: 1,
                    c: cValues.baseAddress!, ldc: c.cols)
            }
        }
    }

    /// c += blockᵀ · x[rows of block, :], the contribution of a row block to Gᵀ X (cols(G) × k).
    public static func accumulateBlockTransposedProduct(_ block: RowBlock, _ x: Matrix, into c: inout Matrix) {
        precondition(x.cols == c.cols && block.cols == c.rows && block.rowStart + block.rowCount <= x.rows,
                     "shapes disagree in Gᵀ·X accumulation")
        guard block.rowCount > 0, x.cols > 0 else { return }
        x.storage.withUnsafeBufferPointer { xValues in
            c.storage.withUnsafeMutableBufferPointer { cValues in
                BLAS.gemm(
                    transposeA: true, transposeB: false,
                    m: block.cols, n: x.cols, k: block.rowCount,
                    a: block.values.baseAddress!, lda: block.cols,
                    b: xValues.baseAddress! + block.rowStart * x.cols, ldb: x.cols,
                    beta: 1,
                    c: cValues.baseAddress!, ldc: c.cols)
            }
        }
    }

    /// self += other, elementwise.
    public mutating func add(_ other: Matrix) {
        precondition(rows == other.rows && cols == other.cols, "cannot add \(other.rows)×\(other.cols) to \(rows)×\(cols)")
        guard !storage.isEmpty else { return }
        other.storage.withUnsafeBufferPointer { source in
            storage.withUnsafeMutableBufferPointer { target in
                cblas_saxpy(blasint(source.count), 1, source.baseAddress!, 1, target.baseAddress!, 1)
            }
        }
    }
}

extension Matrix {
    /// self[block rows, :] += block.
    public mutating func addRows(_ block: RowBlock) {
        precondition(block.cols == cols && block.rowStart + block.rowCount <= rows, "row block \(block.rowRange)×\(block.cols) outside \(rows)×\(cols)")
        guard block.values.count > 0 else { return }
        storage.withUnsafeMutableBufferPointer { target in
            cblas_saxpy(blasint(block.values.count), 1, block.values.baseAddress!, 1, target.baseAddress! + block.rowStart * cols, 1)
        }
    }
}
