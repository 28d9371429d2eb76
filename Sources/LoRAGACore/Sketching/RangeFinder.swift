/// Top singular triplets of a matrix, truncated: U [rows × t], S [t], Vt [t × cols].
public struct TruncatedSVD: Sendable, Equatable {
    public var u: Matrix
    public var s: [Float]
    public var vt: Matrix

    public var rank: Int { s.count }
}

/// Sizes of a randomized SVD. The measurements behind the defaults are in
/// Scripts/bench-results/README.md.
public struct RandomizedSVDParameters: Sendable, Equatable {
    /// Singular triplets wanted: LoRA-GA needs 2r.
    public var targetRank: Int
    /// Extra sketch columns beyond `targetRank` (Halko et al. §4.2: p = 5–10 suffices for
    /// fast decay; gradients decay slowly, so more buys accuracy of the r-th to 2r-th vectors).
    public var oversampling: Int
    /// How many times G or Gᵀ is applied (≥ 2). Two is the plain range finder
    /// (Y = GΩ, then QᵀG); each further pass is half a power iteration, re-orthonormalized.
    public var passes: Int
    public var seed: UInt64

    public init(targetRank: Int, oversampling: Int, passes: Int, seed: UInt64) {
        self.targetRank = targetRank
        self.oversampling = oversampling
        self.passes = passes
        self.seed = seed
    }

    /// Sketch width k = 2r + p, capped by the matrix.
    public func sketchWidth(rows: Int, cols: Int) -> Int {
        Swift.min(targetRank + oversampling, rows, cols)
    }
}

public enum RandomizedSVDError: Error, CustomStringConvertible, Equatable {
    case rankTooLarge(layer: String, rows: Int, cols: Int, targetRank: Int)
    case zeroMatrix(layer: String)
    case nonFinite(layer: String)
    case badParameters(String)

    public var description: String {
        switch self {
        case let .rankTooLarge(layer, rows, cols, targetRank):
            return "layer '\(layer)' is \(rows)×\(cols): it has at most \(Swift.min(rows, cols)) singular directions, but LoRA-GA at this rank needs \(targetRank) (2r); lower --rank or leave the layer out with --target"
        case let .zeroMatrix(layer):
            return "layer '\(layer)': the summed gradient is all zero, so it has no directions to initialize from (is the layer frozen, or were no gradients written?); leave it out with --target"
        case let .nonFinite(layer):
            return "layer '\(layer)': the sketch became NaN/Inf; the gradient contains non-finite values"
        case let .badParameters(text):
            return text
        }
    }
}

/// Randomized SVD by range finding with power iterations (Halko, Martinsson & Tropp 2011,
/// Alg. 4.4), written as a pure state machine: it asks for products with G or Gᵀ and is
/// fed the answers. The same machine runs over a matrix in memory (dense), over files
/// re-read in row blocks (power), and over workers across the network (distributed power),
/// so all three give the same factors for the same products.
public struct RangeFinder: Sendable {
    /// What the machine needs next.
    public enum Request: Sendable, Equatable {
        /// Send back G · X (X is cols × k).
        case range(Matrix)
        /// Send back Gᵀ · X (X is rows × k).
        case coRange(Matrix)
        /// Send back Y = G · X and Z = Gᵀ · Y, both from one pass over G (two passes' worth of
        /// work for one read). Only asked of sources that hold G whole — the files or memory of
        /// one process — since Gᵀ(Σ_w G_w X) is not Σ_w G_wᵀ G_w X across workers.
        case gram(Matrix)
    }

    /// The answer to a request.
    public enum Product: Sendable {
        case single(Matrix)
        case gram(y: Matrix, z: Matrix)
    }

    public enum Step: Sendable, Equatable {
        case need(Request)
        case finished(TruncatedSVD)
    }

    public let rows: Int
    public let cols: Int
    public let parameters: RandomizedSVDParameters
    public let sketchWidth: Int
    private let layerName: String
    /// Products received so far (the round number of the next request).
    public private(set) var passesDone = 0
    /// The orthonormal basis that was last sent out; its product is what comes back.
    private var lastBasis: Matrix?
    private var pending: Request?
    /// Ask for `.gram` products where two passes in a row allow it.
    public let fusesPairs: Bool

    /// - Parameter fusesPairs: the source answers `.gram` requests (one process holding all of G).
    ///   Same subspaces as the unfused sequence, with half the reads of G.
    public init(rows: Int, cols: Int, parameters: RandomizedSVDParameters, layerName: String, fusesPairs: Bool = false) throws {
        guard parameters.passes >= 2 else {
            throw RandomizedSVDError.badParameters("passes must be at least 2 (got \(parameters.passes))")
        }
        guard parameters.targetRank >= 1 else {
            throw RandomizedSVDError.badParameters("target rank must be at least 1 (got \(parameters.targetRank))")
        }
        guard parameters.targetRank <= Swift.min(rows, cols) else {
            throw RandomizedSVDError.rankTooLarge(layer: layerName, rows: rows, cols: cols, targetRank: parameters.targetRank)
        }
        self.rows = rows
        self.cols = cols
        self.parameters = parameters
        self.layerName = layerName
        self.sketchWidth = parameters.sketchWidth(rows: rows, cols: cols)
        self.fusesPairs = fusesPairs
    }

    /// A range-side request for `basis`, fused with the co-range pass after it when at least
    /// three applications remain (a fused pair must not be the last step: finishing needs an
    /// orthonormal basis on the side the last product came from).
    private func rangeRequest(_ basis: Matrix) -> Request {
        fusesPairs && parameters.passes - passesDone >= 3 ? .gram(basis) : .range(basis)
    }

    /// The first request: Y = G Ω with a random Ω regenerated from (seed, layer).
    public mutating func start() -> Step {
        let omega = TestMatrixGenerator(seed: parameters.seed, layerName: layerName)
            .matrix(rowCount: cols, width: sketchWidth, kind: .range)
        let request = rangeRequest(omega)
        pending = request
        return .need(request)
    }

    /// Feed the product asked for by the last request.
    public mutating func advance(with product: Matrix) throws -> Step {
        try advance(with: .single(product))
    }

    /// Feed the answer to the last request.
    public mutating func advance(with answer: Product) throws -> Step {
        guard let request = pending else {
            throw RandomizedSVDError.badParameters("RangeFinder.advance called with no request outstanding")
        }
        if case .gram = request {
            guard case .gram(let y, let z) = answer else {
                throw RandomizedSVDError.badParameters("a gram request was answered with a single product")
            }
            precondition(y.rows == rows && y.cols == sketchWidth && z.rows == cols && z.cols == sketchWidth, "gram product has shapes \(y.rows)×\(y.cols), \(z.rows)×\(z.cols)")
            guard z.storage.allSatisfy(\.isFinite) else { throw RandomizedSVDError.nonFinite(layer: layerName) }
            guard y.frobeniusNormSquared > 0, z.frobeniusNormSquared > 0 else { throw RandomizedSVDError.zeroMatrix(layer: layerName) }
            // span(Gᵀ Y) = span(Gᵀ orth(Y)): the QR of Y between the two halves changes nothing but scale.
            passesDone += 2
            let basis = try z.orthonormalizedColumns()
            lastBasis = basis
            let next = rangeRequest(basis)
            pending = next
            return .need(next)
        }
        guard case .single(let product) = answer else {
            throw RandomizedSVDError.badParameters("a single-product request was answered with a gram pair")
        }
        switch request {
        case .range:
            precondition(product.rows == rows && product.cols == sketchWidth, "range product has shape \(product.rows)×\(product.cols), expected \(rows)×\(sketchWidth)")
        case .coRange:
            precondition(product.rows == cols && product.cols == sketchWidth, "co-range product has shape \(product.rows)×\(product.cols), expected \(cols)×\(sketchWidth)")
        case .gram:
            preconditionFailure("handled above")
        }
        guard product.storage.allSatisfy(\.isFinite) else { throw RandomizedSVDError.nonFinite(layer: layerName) }
        passesDone += 1
        if passesDone == parameters.passes {
            pending = nil
            return .finished(try finish(request: request, product: product))
        }
        guard product.frobeniusNormSquared > 0 else { throw RandomizedSVDError.zeroMatrix(layer: layerName) }
        // Re-orthonormalize every pass: float32 power iterations otherwise collapse onto
        // the top singular vector and lose the r-th..2r-th directions LoRA-GA needs.
        let basis = try product.orthonormalizedColumns()
        lastBasis = basis
        let next: Request
        switch request {
        case .range: next = .coRange(basis)
        case .coRange, .gram: next = rangeRequest(basis)
        }
        pending = next
        return .need(next)
    }

    /// Rayleigh–Ritz on the last basis: if the last product was Z = GᵀQ, then
    /// QQᵀG = Q Zᵀ and an SVD of the small Z gives the factors; symmetrically for Y = GP.
    private func finish(request: Request, product: Matrix) throws -> TruncatedSVD {
        guard product.frobeniusNormSquared > 0 else { throw RandomizedSVDError.zeroMatrix(layer: layerName) }
        guard let basis = lastBasis else {
            throw RandomizedSVDError.badParameters("RangeFinder finished without a basis")
        }
        let t = parameters.targetRank
        let small = try product.singularValueDecomposition()   // product = Ũ S Wᵀ, Ũ tall
        var result: TruncatedSVD
        switch request {
        case .coRange:
            // Z = GᵀQ = Ṽ S Wᵀ  ⇒  QᵀG = W S Ṽᵀ  ⇒  G ≈ (Q W) S Ṽᵀ
            let w = small.vt.transposed()
            let u = Matrix.product(basis, w)
            result = TruncatedSVD(u: u.columns(0..<t), s: Array(small.s.prefix(t)), vt: small.u.columns(0..<t).transposed())
        case .range, .gram:
            // Y = GP = Ũ S Wᵀ  ⇒  GPPᵀ = Ũ S (P W)ᵀ
            let v = Matrix.product(basis, small.vt, transposeB: true)
            result = TruncatedSVD(u: small.u.columns(0..<t), s: Array(small.s.prefix(t)), vt: v.columns(0..<t).transposed())
        }
        result.applySignConvention()
        return result
    }
}

extension TruncatedSVD {
    /// Singular vectors are defined up to sign; pair i's sign is fixed so that the
    /// largest-magnitude entry of u_i (first one on ties) is positive. Same data ⇒ same bytes.
    public mutating func applySignConvention() {
        for i in 0..<s.count {
            var best = 0
            var bestMagnitude: Float = -1
            for row in 0..<u.rows {
                let magnitude = abs(u[row, i])
                if magnitude > bestMagnitude {
                    bestMagnitude = magnitude
                    best = row
                }
            }
            guard u[best, i] < 0 else { continue }
            for row in 0..<u.rows { u[row, i] = -u[row, i] }
            for col in 0..<vt.cols { vt[i, col] = -vt[i, col] }
        }
    }
}
