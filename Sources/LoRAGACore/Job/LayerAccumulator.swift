/// One layer's streamed gradient on its way to a truncated SVD, in `dense` or `sketch` mode.
/// Both are linear in G: row blocks from any file or worker add in any order.
public struct LayerAccumulator: Sendable {
    public let name: String
    public let rows: Int
    public let cols: Int
    /// Exactly one of these is set: the summed gradient (dense) or its sketch.
    private var dense: Matrix?
    private var sketch: SingleViewSketch?
    /// Dense: rows below this hold the sum so far; rows from it on hold whatever the memory
    /// held before and count as zero. A block reaching past it stores its rows there instead
    /// of adding them, so a layer whose sources send rows in order (each worker does) is
    /// never zeroed and its first arrival of each row is a copy, not a read-add-write.
    private var writtenRows = 0
    /// Dense: rows whose pages are mapped. A fresh sum maps its pages a few MB ahead of the
    /// rows written (`populateBytes` at a time, one `madvise(MADV_POPULATE_WRITE)` each)
    /// rather than all at once when it is made, so the mapping overlaps with `lora-ga init`
    /// reading the next block on its helper thread instead of stalling before the first row.
    private var populatedRows = 0
    static let populateBytes = 16 << 20

    /// `reusing`: a finished layer's sum (``takeStorage()``) of exactly rows × cols floats,
    /// used in place of fresh memory without being cleared (see `writtenRows`), which saves a
    /// large layer's page faults and zeroing. Pass it consumed (the only reference), or the
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
            if let storage = spare.take(), storage.count == rows * cols {
                dense = Matrix(rows: rows, cols: cols, storage: storage)
                populatedRows = rows
            } else {
                dense = Matrix.unspecified(rows: rows, cols: cols)   // see `writtenRows`
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
            guard let base = block.values.baseAddress else { return }
            _ = addDense(rowStart: block.rowStart, rowCount: block.rowCount, from: UnsafeRawPointer(base))
        } else {
            sketch!.fold(block)
        }
    }

    /// Adds a block (rows and a column window of the layer) at its offset: a full-width block
    /// takes the row-block path; a narrower one is added row by row into the sum, or folded
    /// into the sketch with the test matrices' rows of its columns.
    public mutating func add(_ block: LayerBlock) {
        let region = block.region
        precondition(region.rows.upperBound <= rows && region.cols.upperBound <= cols, "block \(region) outside layer '\(name)' \(rows)×\(cols)")
        if region.cols == 0..<cols {
            return add(RowBlock(rowStart: region.rows.lowerBound, rowCount: region.rows.count, cols: cols, values: block.values))
        }
        if dense != nil {
            guard let base = block.values.baseAddress else { return }
            _ = addDense(region, from: UnsafeRawPointer(base))
        } else {
            sketch!.fold(block)
        }
    }

    /// Adds a block of a dense sum straight from native-endian Float32 bytes at any alignment
    /// (a wire payload), rows `region.rows`, `region.cols.count` values each, checking them for
    /// NaN/Inf in the same pass. Returns the index (into `bytes`, in floats) of the first
    /// non-finite value, after which the sum is unusable.
    public mutating func addDenseFloat32(_ region: LayerRegion, bytes: UnsafeRawBufferPointer) -> Int? {
        if region.cols == 0..<cols { return addDenseFloat32(rowStart: region.rows.lowerBound, bytes: bytes) }
        precondition(dense != nil && bytes.count == 4 * region.elementCount && region.rows.upperBound <= rows && region.cols.upperBound <= cols,
                     "\(bytes.count) bytes for block \(region) of dense layer '\(name)' \(rows)×\(cols)")
        guard let base = bytes.baseAddress, addDense(region, from: base) else { return nil }
        return (0..<region.elementCount).first { !base.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self).isFinite }
    }

    /// A block narrower than the layer: rows from `writtenRows` on are zeroed first (their
    /// other columns must read as zero), then each row of the block is added at its columns.
    private mutating func addDense(_ region: LayerRegion, from source: UnsafeRawPointer) -> Bool {
        let end = region.rows.upperBound
        let (cols, written, populated) = (cols, writtenRows, populatedRows)
        writtenRows = Swift.max(written, end)
        let mapTo = end > populated ? Swift.min(rows, Swift.max(end, populated + Swift.max(1, Self.populateBytes / (4 * cols)))) : populated
        populatedRows = mapTo
        let width = region.cols.count
        return dense!.storage.withUnsafeMutableBufferPointer { sum in
            let target = sum.baseAddress!
            if mapTo > populated {
                ZeroedFloats.populate(UnsafeMutableRawPointer(target + populated * cols), byteCount: 4 * (mapTo - populated) * cols)
            }
            if end > written {
                (target + written * cols).update(repeating: 0, count: (end - written) * cols)
            }
            var bad = false
            for (offset, row) in region.rows.enumerated() {
                bad = FloatKernels.accumulate(source + 4 * offset * width, count: width, into: target + row * cols + region.cols.lowerBound, store: false) || bad
            }
            return bad
        }
    }

    /// Adds rows of a dense sum straight from native-endian Float32 bytes at any alignment
    /// (a wire payload), checking them for NaN/Inf in the same pass. Returns the index (into
    /// `bytes`, in floats) of the first non-finite value, after which the sum is unusable.
    public mutating func addDenseFloat32(rowStart: Int, bytes: UnsafeRawBufferPointer) -> Int? {
        let rowCount = bytes.count / (4 * cols)
        precondition(dense != nil && bytes.count == 4 * rowCount * cols && rowStart + rowCount <= rows,
                     "\(bytes.count) bytes at row \(rowStart) are not whole rows of dense layer '\(name)' \(rows)×\(cols)")
        guard let base = bytes.baseAddress, addDense(rowStart: rowStart, rowCount: rowCount, from: base) else { return nil }
        return (0..<(rowCount * cols)).first { !base.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self).isFinite }
    }

    /// Rows below `writtenRows` are added, rows from it on stored; a gap before the block is
    /// zeroed first. True when a value was NaN or ±Inf.
    private mutating func addDense(rowStart: Int, rowCount: Int, from source: UnsafeRawPointer) -> Bool {
        let end = rowStart + rowCount
        let (cols, written, populated) = (cols, writtenRows, populatedRows)
        writtenRows = Swift.max(written, end)
        let mapTo = end > populated ? Swift.min(rows, Swift.max(end, populated + Swift.max(1, Self.populateBytes / (4 * cols)))) : populated
        populatedRows = mapTo
        return dense!.storage.withUnsafeMutableBufferPointer { sum in
            let target = sum.baseAddress!
            if mapTo > populated {
                ZeroedFloats.populate(UnsafeMutableRawPointer(target + populated * cols), byteCount: 4 * (mapTo - populated) * cols)
            }
            if rowStart > written {
                (target + written * cols).update(repeating: 0, count: (rowStart - written) * cols)
            }
            let split = Swift.min(Swift.max(rowStart, written), end)
            let addCount = (split - rowStart) * cols
            let added = FloatKernels.accumulate(source, count: addCount, into: target + rowStart * cols, store: false)
            let stored = FloatKernels.accumulate(source + 4 * addCount, count: (end - split) * cols, into: target + split * cols, store: true)
            return added || stored
        }
    }

    /// The layer's LoRA-GA factors and report fields.
    public mutating func finish(settings: JobSettings) throws -> (factors: LoRAFactors, svd: TruncatedSVD, fidelityEstimate: Double?) {
        if dense != nil && writtenRows < rows {   // rows no source sent sum to zero
            let start = writtenRows * cols
            dense!.storage.withUnsafeMutableBufferPointer { $0[start...].update(repeating: 0) }
            writtenRows = rows
        }
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

/// The residual against ‖G‖² − Σ ŝ², the tail implied by the singular values found.
/// One pass gives the residual in expanded form (``FidelityAccumulator``); a second pass sums it
/// directly only where the expansion cancels (`FidelityAccumulator.expansionIsInaccurate`),
/// which heavy-tailed real gradients do not need (MiniLM: estimates within 2e-6 of the direct
/// pass). For a dense layer the direct pass cost as much again as the first (a copy and two
/// rank-r updates of every block).
public func estimatedFidelity<Source: RowBlockSource>(of source: inout Source, svd: TruncatedSVD, factors: LoRAFactors) throws -> Double {
    var accumulator = try FidelityAccumulator(factors: factors)
    try source.forEachRowBlock { accumulator.add($0) }
    if accumulator.expansionIsInaccurate { try source.forEachRowBlock { accumulator.addResidual($0) } }
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
