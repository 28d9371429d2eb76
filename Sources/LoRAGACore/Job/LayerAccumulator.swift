/// One layer's streamed gradient on its way to a truncated SVD, in `dense` or `sketch` mode.
/// Both are linear in G: row blocks from any file or worker add in any order.
public struct LayerAccumulator: Sendable {
    public let name: String
    public let rows: Int
    public let cols: Int
    /// Exactly one of these is set: the summed gradient (dense) or its sketch.
    private var dense: Matrix?
    private var sketch: SingleViewSketch?

    /// `reusing`: a finished layer's sum (``takeStorage()``) of exactly rows × cols floats,
    /// zeroed and used in place of fresh memory. A fresh sum of a large layer costs its page
    /// faults and the kernel's zeroing (~0.5 s per GB on this project's VMs); a reused one
    /// costs a memset (~0.04 s per GB). Pass it consumed (the only reference), or the
    /// first add copies it.
    public init(name: String, rows: Int, cols: Int, settings: JobSettings, reusing spare: consuming [Float]? = nil) throws {
        self.name = name
        self.rows = rows
        self.cols = cols
        let target = 2 * settings.lora.rank
        guard target <= Swift.min(rows, cols) else {
            throw RandomizedSVDError.rankTooLarge(layer: name, rows: rows, cols: cols, targetRank: target)
        }
        switch settings.mode {
        case .dense, .power:
            if var storage = spare.take(), storage.count == rows * cols {
                storage.withUnsafeMutableBufferPointer { $0.update(repeating: 0) }
                dense = Matrix(rows: rows, cols: cols, storage: storage)
            } else {
                dense = Matrix(rows: rows, cols: cols)
            }
        case .sketch:
            sketch = try SingleViewSketch(rows: rows, cols: cols, targetRank: target, width: settings.sketchWidth, seed: settings.seed, layerName: name)
        }
    }

    /// Holds the summed gradient itself (any row slices add), not a sketch of it.
    public var isDense: Bool { dense != nil }

    /// Hands over the summed gradient's memory for another layer (nil for a sketch); the
    /// accumulator holds nothing afterwards.
    public mutating func takeStorage() -> [Float]? {
        defer { dense = nil }
        return dense?.storage
    }

    /// Where the sum's floats live (tests check reuse happens without a copy).
    var storageAddress: UnsafeRawPointer? {
        dense?.storage.withUnsafeBufferPointer { UnsafeRawPointer($0.baseAddress) }
    }

    /// Bytes of state held (what this layer costs in memory).
    public var byteCount: Int {
        4 * ((dense?.storage.count ?? 0) + (sketch?.floatCount ?? 0))
    }

    public mutating func add(_ block: RowBlock) {
        precondition(block.cols == cols && block.rowStart + block.rowCount <= rows, "row block \(block.rowRange)×\(block.cols) outside layer '\(name)' \(rows)×\(cols)")
        if dense != nil {
            dense!.addRows(block)
        } else {
            sketch!.fold(block)
        }
    }

    /// The layer's LoRA-GA factors and report fields.
    public func finish(settings: JobSettings) throws -> (factors: LoRAFactors, svd: TruncatedSVD, fidelityEstimate: Double?) {
        if let g = dense {
            // Inputs were checked block by block; only an overflowing sum can get here.
            let bad = g.storage.withUnsafeBufferPointer { RowBlock(rowStart: 0, rowCount: rows, cols: cols, values: $0).firstNonFiniteIndex() }
            if let index = bad {
                throw GradientError.nonFinite(layer: name, source: "summed gradient (Float32 overflow)", row: index / cols)
            }
            // Blocks as in power mode: each is used by both products of a pass pair while it is in
            // cache, where the whole matrix at once is read from memory twice.
            let parameters = settings.randomizedSVD
            let width = parameters.sketchWidth(rows: rows, cols: cols)
            var source = InMemoryRowBlocks(g, blockRows: RowBlock.rowsPerProductBlock(cols: cols, productWidth: width))
            let svd = try randomizedSVD(of: &source, parameters: parameters, layerName: name)
            let factors = LoRAFactors(svd: svd, configuration: settings.lora)
            // The residual pass works per block: blocks of ~8 MB keep its scratch small.
            var blocked = InMemoryRowBlocks(g, blockRows: Swift.max(1, (8 << 20) / Swift.max(1, 4 * cols)))
            return (factors, svd, try estimatedFidelity(of: &blocked, svd: svd, factors: factors))
        }
        let svd = try sketch!.truncatedSVD()
        return (LoRAFactors(svd: svd, configuration: settings.lora), svd, nil)
    }
}

/// The residual against ‖G‖² − Σ ŝ², the tail implied by the singular values found. With
/// `exactResidual` the residual is summed directly in a second pass (exact even when it is
/// tiny next to ‖G‖); without, one pass and the expanded form (DESIGN.md §1).
public func estimatedFidelity<Source: RowBlockSource>(of source: inout Source, svd: TruncatedSVD, factors: LoRAFactors, exactResidual: Bool = true) throws -> Double {
    var accumulator = try FidelityAccumulator(factors: factors)
    try source.forEachRowBlock { accumulator.add($0) }
    if exactResidual { try source.forEachRowBlock { accumulator.addResidual($0) } }
    let tail = Fidelity.tailNorm(gradientNormSquared: accumulator.gradientNormSquared, topSingularValues: svd.s.map(Double.init))
    return Fidelity.ratio(residualNorm: accumulator.residualNorm, tailNorm: tail, gradientNorm: accumulator.gradientNormSquared.squareRoot())
}

/// A gradient that cannot be used, named precisely enough to find the bad value.
public enum GradientError: Error, CustomStringConvertible, Equatable {
    case nonFinite(layer: String, source: String, row: Int)

    public var description: String {
        switch self {
        case let .nonFinite(layer, source, row):
            return "\(source): layer '\(layer)' has a NaN or Inf value in row \(row)"
        }
    }
}
