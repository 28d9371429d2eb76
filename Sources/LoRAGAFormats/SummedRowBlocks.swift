import Foundation
import LoRAGACore

/// A layer's gradient summed over its contributions (whole layers and blocks from several
/// files), handed out in stripes of rows: for each stripe, the first contribution that fills it
/// exactly is read into the stripe buffer, the others are added onto it at their column offset
/// (no second buffer), and a stripe no contribution fills is zeroed first. Memory is one
/// stripe, however large the layer.
///
/// Two ways to stream: ``forEachRowBlock(_:)`` hands out full-width row blocks of the whole
/// layer (uncovered entries are zeros), for dense, sketch and local power; ``forEachBlock(_:)``
/// only the rows the contributions touch, each stripe only as wide as the columns they span,
/// for a worker's power products over its share of the layer.
public struct SummedRowBlocks: RowBlockSource, LayerBlockSource {
    public let contributions: [GradientContribution]
    public let layer: GradientLayer
    public let blockRows: Int
    /// Gradient bytes read from disk so far, over all passes.
    public private(set) var bytesRead = 0
    /// Seconds spent in the callers' block bodies (their GEMMs), not waiting for reads: how fast
    /// the products themselves run, apart from how fast the files can be read and summed.
    public private(set) var blockWorkSeconds = 0.0
    /// For `withSummedRows`; allocated on first use (streaming passes use the prefetcher's buffers).
    private var buffer: [Float] = []
    private var prefetcher: PrefetchingReader?
    /// Set once a whole pass found every value finite. Later passes re-read the same bytes and
    /// skip the NaN/Inf scan; a file changed under a running job still
    /// shows up, less precisely, as a non-finite product (RangeFinder checks every product).
    private var scannedEveryRow = false

    public init(contributions: [GradientContribution], layer: GradientLayer, blockRows: Int) {
        self.contributions = contributions
        self.layer = layer
        self.blockRows = Swift.max(1, Swift.min(blockRows, layer.rows))
    }

    /// Rows per block so one block is about `targetBytes` of Float32 (GEMMs on blocks of a few
    /// MB run at full speed; larger blocks only cost memory).
    public static func blockRows(cols: Int, targetBytes: Int) -> Int {
        Swift.max(1, targetBytes / Swift.max(1, cols * 4))
    }

    public var rows: Int { layer.rows }
    public var cols: Int { layer.cols }

    /// Full-width row blocks in order. The next block is read on a helper thread while `body`
    /// works on the current one, so reading hides behind the GEMMs.
    public mutating func forEachRowBlock(_ body: (RowBlock) throws -> Void) throws {
        let stripes = stride(from: 0, to: layer.rows, by: blockRows).map {
            LayerRegion(rows: $0..<Swift.min($0 + blockRows, layer.rows), cols: 0..<layer.cols)
        }
        guard stripes.count > 1 else {
            if let only = stripes.first {
                var work = 0.0
                try withSummedRows(only.rows) { block in
                    let started = ContinuousClock.now
                    try body(block)
                    work = (ContinuousClock.now - started).seconds
                }
                blockWorkSeconds += work
            }
            return
        }
        let cols = layer.cols
        try stream(stripes) { block in
            try body(RowBlock(rowStart: block.region.rows.lowerBound, rowCount: block.region.rows.count, cols: cols, values: block.values))
        }
    }

    /// Only the part of the layer the contributions touch: stripes of at most `blockRows` rows
    /// over the rows some contribution covers, each as wide as the columns the contributions
    /// overlapping it span. Their embeddings add up to the summed layer, so products over them
    /// (`blockProduct`, `blockTransposedProduct`) cost what the share costs, not the whole layer.
    public mutating func forEachBlock(_ body: (LayerBlock) throws -> Void) throws {
        // Whole layers (and full-width row blocks covering every row): the row-block path as is.
        let fullWidth = contributions.allSatisfy { $0.region.cols == 0..<layer.cols }
        if fullWidth, LayerCoverage.union(contributions.map(\.region.rows)) == [0..<layer.rows] {
            try forEachRowBlock { try body(LayerBlock($0)) }
            return
        }
        var stripes: [LayerRegion] = []
        for covered in LayerCoverage.union(contributions.map(\.region.rows)) {
            for start in stride(from: covered.lowerBound, to: covered.upperBound, by: blockRows) {
                let rows = start..<Swift.min(start + blockRows, covered.upperBound)
                let spans = contributions.map(\.region).filter { $0.rows.overlaps(rows) }.map(\.cols)
                guard let first = spans.map(\.lowerBound).min(), let last = spans.map(\.upperBound).max() else { continue }
                stripes.append(LayerRegion(rows: rows, cols: first..<last))
            }
        }
        try stream(stripes, body)
    }

    /// Fills `stripes` in turn on the prefetching helper (two buffers) and hands each to `body`.
    private mutating func stream(_ stripes: [LayerRegion], _ body: (LayerBlock) throws -> Void) throws {
        guard !stripes.isEmpty else { return }
        let reader = prefetcher ?? PrefetchingReader(contributions: contributions, layer: layer, blockElements: blockRows * layer.cols)
        prefetcher = reader
        let scan = !scannedEveryRow
        reader.start(stripes[0], slot: 0, scan: scan)
        for (position, stripe) in stripes.enumerated() {
            try reader.wait()
            let slot = position % 2
            if position + 1 < stripes.count { reader.start(stripes[position + 1], slot: 1 - slot, scan: scan) }
            do {
                let started = ContinuousClock.now
                try body(LayerBlock(region: stripe, values: UnsafeBufferPointer(rebasing: reader.buffers[slot][0..<stripe.elementCount])))
                blockWorkSeconds += (ContinuousClock.now - started).seconds
            } catch {
                try? reader.wait()   // never leave the helper writing into a buffer we give up
                throw error
            }
            bytesRead += Self.bytes(of: stripe, contributions: contributions, layer: layer)
        }
        scannedEveryRow = true
    }

    /// Bytes read from the files to fill `stripe`.
    static func bytes(of stripe: LayerRegion, contributions: [GradientContribution], layer: GradientLayer) -> Int {
        let size = layer.dtype.byteSize
        return contributions.reduce(0) { total, contribution in
            let region = contribution.region
            guard region.cols.overlaps(stripe.cols) else { return total }
            return total + region.rows.clamped(to: stripe.rows).count * region.cols.count * size
        }
    }

    /// Reads rows `range` (at most `blockRows`) summed over every file and passes them to `body`.
    /// A NaN/Inf is an error naming the file, layer and row.
    public mutating func withSummedRows<Result>(_ range: Range<Int>, _ body: (RowBlock) throws -> Result) throws -> Result {
        precondition(range.count <= blockRows && range.upperBound <= layer.rows, "rows \(range) exceed the block size \(blockRows) or the layer's \(layer.rows) rows")
        let (contributions, layer) = (self.contributions, self.layer)
        let stripe = LayerRegion(rows: range, cols: 0..<layer.cols)
        if buffer.count < blockRows * layer.cols { buffer = [Float](repeating: 0, count: blockRows * layer.cols) }
        let result = try buffer.withUnsafeMutableBufferPointer { whole in
            let block = UnsafeMutableBufferPointer(rebasing: whole[0..<(range.count * layer.cols)])
            try SummedRowBlocks.fill(block, contributions: contributions, layer: layer, stripe: stripe)
            return try body(RowBlock(rowStart: range.lowerBound, rowCount: range.count, cols: layer.cols, values: UnsafeBufferPointer(block)))
        }
        bytesRead += Self.bytes(of: stripe, contributions: contributions, layer: layer)
        return result
    }

    /// The sum of every contribution over `stripe` into `block` (row-major, `stripe.cols.count`
    /// wide); checks for NaN/Inf when `scan`. Each contribution must lie within the stripe's
    /// columns or miss them.
    static func fill(_ block: UnsafeMutableBufferPointer<Float>, contributions: [GradientContribution], layer: GradientLayer, stripe: LayerRegion, scan: Bool = true) throws {
        precondition(block.count == stripe.elementCount, "\(block.count) floats for stripe \(stripe)")
        let width = stripe.cols.count
        var overlapping = contributions.filter { $0.region.rows.overlaps(stripe.rows) && $0.region.cols.overlaps(stripe.cols) }
        // Whole layers (and row blocks as wide as the stripe) fill it by a plain read.
        if let index = overlapping.firstIndex(where: { $0.region.cols == stripe.cols && $0.region.rows.clamped(to: stripe.rows) == stripe.rows }) {
            let first = overlapping.remove(at: index)
            let local = (stripe.rows.lowerBound - first.region.rows.lowerBound)..<(stripe.rows.upperBound - first.region.rows.lowerBound)
            try first.file.readRows(first.tensor, rows: local, into: block)
        } else {
            block.update(repeating: 0)
        }
        for contribution in overlapping {
            try add(contribution, into: block, stripe: stripe, width: width)
        }
        guard scan else { return }
        let view = RowBlock(rowStart: stripe.rows.lowerBound, rowCount: stripe.rows.count, cols: width, values: UnsafeBufferPointer(block))
        if view.firstNonFiniteIndex() != nil {
            // One check per contribution would need a second buffer; check the sum and, only
            // if it is bad, find the contribution that brought the bad value.
            try locateNonFinite(contributions: contributions.filter { $0.region.rows.overlaps(stripe.rows) && $0.region.cols.overlaps(stripe.cols) },
                                layer: layer, rows: stripe.rows)
        }
    }

    /// Adds `contribution`'s rows within the stripe at its column offset.
    private static func add(_ contribution: GradientContribution, into block: UnsafeMutableBufferPointer<Float>, stripe: LayerRegion, width: Int) throws {
        let region = contribution.region
        precondition(region.cols.clamped(to: stripe.cols) == region.cols, "block \(region) is cut by stripe \(stripe)")
        let rows = region.rows.clamped(to: stripe.rows)
        let local = (rows.lowerBound - region.rows.lowerBound)..<(rows.upperBound - region.rows.lowerBound)
        let firstRow = rows.lowerBound - stripe.rows.lowerBound
        if region.cols == stripe.cols {
            try contribution.file.addRows(contribution.tensor, rows: local,
                                          into: UnsafeMutableBufferPointer(rebasing: block[(firstRow * width)..<((firstRow + rows.count) * width)]))
        } else {
            try contribution.file.addRows(contribution.tensor, rows: local,
                                          into: block.baseAddress! + firstRow * width + (region.cols.lowerBound - stripe.cols.lowerBound), rowStride: width)
        }
    }

    /// Re-reads the stripe contribution by contribution to name the one holding a NaN/Inf. Rare path.
    static func locateNonFinite(contributions: [GradientContribution], layer: GradientLayer, rows: Range<Int>) throws {
        for contribution in contributions {
            let region = contribution.region
            let within = region.rows.clamped(to: rows)
            let local = (within.lowerBound - region.rows.lowerBound)..<(within.upperBound - region.rows.lowerBound)
            var scratch = [Float](repeating: 0, count: within.count * region.cols.count)
            try scratch.withUnsafeMutableBufferPointer { values in
                try contribution.file.readRows(contribution.tensor, rows: local, into: values)
                let view = RowBlock(rowStart: within.lowerBound, rowCount: within.count, cols: region.cols.count, values: UnsafeBufferPointer(values))
                if let index = view.firstNonFiniteIndex() {
                    throw GradientError.nonFinite(layer: layer.name, source: contribution.file.path, row: within.lowerBound + index / region.cols.count)
                }
            }
        }
        // Every contribution is finite but the sum overflowed Float32.
        throw GradientError.nonFinite(layer: layer.name, source: "sum of \(contributions.count) files", row: rows.lowerBound)
    }
}

/// Two block buffers and a helper thread that fills one while the caller uses the other.
/// Invariant: between `start` and the matching `wait`, only the helper touches the files and
/// the buffer being filled; the caller touches neither (hence `@unchecked Sendable`).
final class PrefetchingReader: @unchecked Sendable {
    let contributions: [GradientContribution]
    let layer: GradientLayer
    let buffers: [UnsafeMutableBufferPointer<Float>]
    private let queue = DispatchQueue(label: "lora-ga.prefetch")
    private let group = DispatchGroup()
    private var failure: Error?

    init(contributions: [GradientContribution], layer: GradientLayer, blockElements: Int) {
        self.contributions = contributions
        self.layer = layer
        self.buffers = (0..<2).map { _ in
            let buffer = UnsafeMutableBufferPointer<Float>.allocate(capacity: blockElements)
            buffer.initialize(repeating: 0)
            return buffer
        }
    }

    deinit {
        group.wait()
        for buffer in buffers { buffer.deallocate() }
    }

    func start(_ stripe: LayerRegion, slot: Int, scan: Bool) {
        queue.async(group: group) {
            do {
                try SummedRowBlocks.fill(UnsafeMutableBufferPointer(rebasing: self.buffers[slot][0..<stripe.elementCount]),
                                         contributions: self.contributions, layer: self.layer, stripe: stripe, scan: scan)
            } catch {
                self.failure = error
            }
        }
    }

    /// Waits for the block being read; rethrows its read error.
    func wait() throws {
        group.wait()
        if let failure {
            self.failure = nil
            throw failure
        }
    }
}
