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
    /// An orthonormal basis of the column space of a tall matrix (rows ≥ cols), by
    /// Householder LQ of the transpose (sgelqf + sorglq). Householder keeps Q orthonormal in float32 even
    /// when the columns are nearly dependent, which power iterations need (Halko et al. §4.5).
    public func orthonormalizedColumns() throws -> Matrix {
        precondition(rows >= cols, "orthonormalizedColumns needs rows ≥ cols, got \(rows)×\(cols)")
        guard cols > 0 else { return self }
        // Row-major self is column-major selfᵀ (cols × rows, wide). Its LQ factorization
        // selfᵀ = L·Q leaves Q (orthonormal rows) in that buffer, and read back row-major it is
        // Qᵀ: orthonormal columns spanning self's, with no transposed copies.
        var columnMajor = storage
        try Matrix.householderQ(&columnMajor, m: cols, n: rows, .lq)
        return Matrix(rows: rows, cols: cols, storage: columnMajor)
    }

    /// Pᵀ for P = an orthonormal basis of the row space of a wide matrix (rows ≤ cols), i.e.
    /// `transposed().orthonormalizedColumns().transposed()` without its three copies: the
    /// row-major buffer of self already is selfᵀ in LAPACK's column-major layout.
    public func orthonormalizedRows() throws -> Matrix {
        precondition(rows <= cols, "orthonormalizedRows needs rows ≤ cols, got \(rows)×\(cols)")
        guard rows > 0 else { return self }
        var columnMajor = storage
        try Matrix.householderQ(&columnMajor, m: cols, n: rows, .qr)
        return Matrix(rows: rows, cols: cols, storage: columnMajor)
    }

    /// Householder factorizations whose orthonormal factor we keep.
    enum Householder {
        /// A = Q·R for m ≥ n: Q (m×n) has orthonormal columns (sgeqrf + sorgqr).
        case qr
        /// A = L·Q for m ≤ n: Q (m×n) has orthonormal rows (sgelqf + sorglq).
        case lq
    }

    /// Overwrites a column-major m×n buffer with the Q of its QR or LQ factorization.
    static func householderQ(_ a: inout [Float], m rowCount: Int, n columnCount: Int, _ kind: Householder) throws {
        // Both pairs of routines take the same arguments; only the names differ.
        let (factor, form, names) = kind == .qr
            ? (sgeqrf_, sorgqr_, ("sgeqrf", "sorgqr"))
            : (sgelqf_, sorglq_, ("sgelqf", "sorglq"))
        var m = Int32(rowCount), n = Int32(columnCount), lda = Int32(rowCount), info: Int32 = 0
        var k = Swift.min(m, n)
        var tau = [Float](repeating: 0, count: Int(k))
        var workSize: Float = 0
        var query: Int32 = -1
        factor(&m, &n, &a, &lda, &tau, &workSize, &query, &info)
        var lwork = Int32(workSize)
        var work = [Float](repeating: 0, count: Int(Swift.max(lwork, 1)))
        factor(&m, &n, &a, &lda, &tau, &work, &lwork, &info)
        guard info == 0 else { throw LAPACKError(routine: names.0, info: info) }
        query = -1
        form(&m, &n, &k, &a, &lda, &tau, &workSize, &query, &info)
        lwork = Int32(workSize)
        if Int(lwork) > work.count { work = [Float](repeating: 0, count: Int(lwork)) }
        form(&m, &n, &k, &a, &lda, &tau, &work, &lwork, &info)
        guard info == 0 else { throw LAPACKError(routine: names.1, info: info) }
    }

    /// Thin SVD by divide and conquer (sgesdd, JOBZ = 'S').
    public func singularValueDecomposition() throws -> SVDResult {
        let p = Swift.min(rows, cols)
        guard p > 0 else {
            return SVDResult(u: Matrix(rows: rows, cols: 0), s: [], vt: Matrix(rows: 0, cols: cols))
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
