import COpenBLAS

/// A LAPACK routine reported failure; `info` is its INFO output.
public struct LAPACKError: Error, CustomStringConvertible {
    public let routine: String
    public let info: Int32
    public var description: String {
        info < 0
            ? "\(routine): argument \(-info) was invalid (a bug in lora-ga, please report it)"
            : "\(routine): did not converge (info \(info)); the matrix may contain NaN or Inf"
    }
}

/// Thin SVD A = U · diag(S) · Vt of a row-major matrix, singular values descending.
public struct SVDResult: Sendable {
    public var u: Matrix        // rows × p
    public var s: [Float]       // p
    public var vt: Matrix       // p × cols
}

extension Matrix {
    /// An orthonormal basis of the column space of a tall matrix (rows ≥ cols), by Householder
    /// QR (sgeqrf + sorgqr). Householder keeps Q orthonormal in float32 even when the columns are
    /// nearly dependent, which power iterations need (Halko et al. §4.5).
    ///
    /// LAPACK is column-major, so the row-major buffer is transposed first: sgeqrf then walks
    /// contiguous columns. The LQ of the buffer as it stands would need no copies but walks
    /// every reflector with a stride of `cols` floats, which is several times slower.
    public func orthonormalizedColumns() throws -> Matrix {
        precondition(rows >= cols, "orthonormalizedColumns needs rows ≥ cols, got \(rows)×\(cols)")
        guard cols > 0 else { return self }
        return try transposed().orthonormalizedRows().transposed()
    }

    /// Pᵀ for P = an orthonormal basis of the row space of a wide matrix (rows ≤ cols), with no
    /// copies: the row-major buffer of self already is selfᵀ (tall) in LAPACK's column-major layout.
    public func orthonormalizedRows() throws -> Matrix {
        precondition(rows <= cols, "orthonormalizedRows needs rows ≤ cols, got \(rows)×\(cols)")
        guard rows > 0 else { return self }
        var columnMajor = storage
        try Matrix.householderQ(&columnMajor, m: cols, n: rows)
        return Matrix(rows: rows, cols: cols, storage: columnMajor)
    }

    /// Overwrites a column-major m×n buffer (m ≥ n) with the Q of its QR factorization
    /// (sgeqrf + sorgqr): n orthonormal columns.
    static func householderQ(_ a: inout [Float], m rowCount: Int, n columnCount: Int) throws {
        var m = Int32(rowCount), n = Int32(columnCount), lda = Int32(rowCount), info: Int32 = 0
        var k = Swift.min(m, n)
        var tau = [Float](repeating: 0, count: Int(k))
        var workSize: Float = 0
        var query: Int32 = -1
        sgeqrf_(&m, &n, &a, &lda, &tau, &workSize, &query, &info)
        var lwork = Int32(workSize)
        var work = [Float](repeating: 0, count: Int(Swift.max(lwork, 1)))
        sgeqrf_(&m, &n, &a, &lda, &tau, &work, &lwork, &info)
        guard info == 0 else { throw LAPACKError(routine: "sgeqrf", info: info) }
        query = -1
        sorgqr_(&m, &n, &k, &a, &lda, &tau, &workSize, &query, &info)
        lwork = Int32(workSize)
        if Int(lwork) > work.count { work = [Float](repeating: 0, count: Int(lwork)) }
        sorgqr_(&m, &n, &k, &a, &lda, &tau, &work, &lwork, &info)
        guard info == 0 else { throw LAPACKError(routine: "sorgqr", info: info) }
    }

    /// Thin SVD by divide and conquer (sgesdd, JOBZ = 'S').
    public func singularValueDecomposition() throws -> SVDResult {
        let p = Swift.min(rows, cols)
        guard p > 0 else {
            return SVDResult(u: Matrix(rows: rows, cols: 0), s: [], vt: Matrix(rows: 0, cols: cols))
        }
        if rows > cols {
            // A tall row-major buffer is a wide column-major one, whose sgesdd starts with a
            // strided LQ; the transpose's is contiguous, and faster.
            // Aᵀ = U' S V'ᵀ ⇔ A = V' S U'ᵀ.
            let ofTranspose = try transposed().singularValueDecomposition()
            return SVDResult(u: ofTranspose.vt.transposed(), s: ofTranspose.s, vt: ofTranspose.u.transposed())
        }
        // LAPACK sees the row-major buffer as the column-major transpose Aᵀ (cols × rows).
        // Aᵀ = U' S V'ᵀ gives A = V' S U'ᵀ: LAPACK's VT buffer read row-major is our U,
        // and its U buffer read row-major is our Vt — no copies needed.
        var a = storage
        var m = Int32(cols), n = Int32(rows), lda = Int32(cols)
        var ldu = Int32(cols), ldvt = Int32(p)
        var s = [Float](repeating: 0, count: p)
        var lapackU = [Float](repeating: 0, count: cols * p)
        var lapackVT = [Float](repeating: 0, count: p * rows)
        var iwork = [Int32](repeating: 0, count: 8 * p)
        var info: Int32 = 0
        var workSize: Float = 0
        var query: Int32 = -1
        var jobz = Int8(UInt8(ascii: "S"))
        sgesdd_(&jobz, &m, &n, &a, &lda, &s, &lapackU, &ldu, &lapackVT, &ldvt, &workSize, &query, &iwork, &info, 1)
        // sgesdd's float workspace answer can round down for large sizes; pad it.
        var lwork = Int32(Swift.min(Double(workSize) * 1.01 + 64, Double(Int32.max)))
        var work = [Float](repeating: 0, count: Int(lwork))
        sgesdd_(&jobz, &m, &n, &a, &lda, &s, &lapackU, &ldu, &lapackVT, &ldvt, &work, &lwork, &iwork, &info, 1)
        guard info == 0 else { throw LAPACKError(routine: "sgesdd", info: info) }
        return SVDResult(
            u: Matrix(rows: rows, cols: p, storage: lapackVT),
            s: s,
            vt: Matrix(rows: p, cols: cols, storage: lapackU))
    }

    /// All singular values, computed in double precision (dgesdd, JOBZ = 'N'):
    /// the reference against which randomized results are judged.
    public func exactSingularValues() throws -> [Double] {
        let p = Swift.min(rows, cols)
        guard p > 0 else { return [] }
        var a = storage.map(Double.init)
        var m = Int32(cols), n = Int32(rows), lda = Int32(cols)
        var one: Int32 = 1
        var s = [Double](repeating: 0, count: p)
        var dummyU = [Double](repeating: 0, count: 1)
        var dummyVT = [Double](repeating: 0, count: 1)
        var iwork = [Int32](repeating: 0, count: 8 * p)
        var info: Int32 = 0
        var workSize: Double = 0
        var query: Int32 = -1
        var jobz = Int8(UInt8(ascii: "N"))
        dgesdd_(&jobz, &m, &n, &a, &lda, &s, &dummyU, &one, &dummyVT, &one, &workSize, &query, &iwork, &info, 1)
        var lwork = Int32(workSize) + 64
        var work = [Double](repeating: 0, count: Int(lwork))
        dgesdd_(&jobz, &m, &n, &a, &lda, &s, &dummyU, &one, &dummyVT, &one, &work, &lwork, &iwork, &info, 1)
        guard info == 0 else { throw LAPACKError(routine: "dgesdd", info: info) }
        return s
    }

    /// X minimizing ‖self · X − rhs‖_F, via the SVD pseudo-inverse with the usual
    /// relative cut-off (singular values below max(rows, cols) · ε · s₁ are dropped).
    public func leastSquaresSolution(_ rhs: Matrix) throws -> Matrix {
        precondition(rhs.rows == rows, "least squares: right-hand side has \(rhs.rows) rows, matrix has \(rows)")
        let svd = try singularValueDecomposition()
        let cutoff = Float(Swift.max(rows, cols)) * Float.ulpOfOne * (svd.s.first ?? 0)
        // X = V · diag(1/s) · Uᵀ · rhs
        var projected = Matrix.product(svd.u, rhs, transposeA: true)    // p × nrhs
        for i in 0..<projected.rows {
            let inverse: Float = svd.s[i] > cutoff ? 1 / svd.s[i] : 0
            for j in 0..<projected.cols { projected[i, j] *= inverse }
        }
        return Matrix.product(svd.vt, projected, transposeA: true)       // cols × nrhs
    }
}
