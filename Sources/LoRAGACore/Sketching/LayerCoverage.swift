/// Which entries of a layer [rows × cols] some block covers: the union of the blocks' rectangles.
/// "Covered" means every entry G[i, j] lies in at least one block; a row touched by some block
/// can still have uncovered columns (a column shard missing from one row shard), so coverage
/// is reported as the uncovered rectangles, not as rows and columns separately.
public struct LayerCoverage: Sendable, Hashable, Codable {
    public let rows: Int
    public let cols: Int
    /// The blocks' rectangles as given (clipped to the layer), in order.
    public let regions: [LayerRegion]

    public init(rows: Int, cols: Int, regions: [LayerRegion]) {
        self.rows = rows
        self.cols = cols
        self.regions = regions.map {
            LayerRegion(rows: $0.rows.clamped(to: 0..<rows), cols: $0.cols.clamped(to: 0..<cols))
        }.filter { !$0.isEmpty }
    }

    /// True when every entry is in some block.
    public var isComplete: Bool { uncovered.isEmpty }

    /// Rows some block touches, as sorted disjoint ranges.
    public var coveredRows: [Range<Int>] { Self.union(regions.map(\.rows)) }

    /// Columns some block touches, as sorted disjoint ranges.
    public var coveredCols: [Range<Int>] { Self.union(regions.map(\.cols)) }

    /// The entries no block covers, as disjoint rectangles: the layer is cut into bands of rows
    /// between consecutive block edges, each band's uncovered columns are the gaps between its
    /// blocks' column ranges, and neighbouring bands with the same gaps merge into one rectangle.
    public var uncovered: [LayerRegion] {
        guard rows > 0, cols > 0 else { return [] }
        var edges = Set([0, rows])
        for region in regions { edges.insert(region.rows.lowerBound); edges.insert(region.rows.upperBound) }
        let sortedEdges = edges.sorted()
        var result: [LayerRegion] = []
        var open: [(cols: Range<Int>, rowStart: Int)] = []   // gaps of the band run so far
        var openEnd = 0
        for (start, end) in zip(sortedEdges, sortedEdges.dropFirst()) {
            let covering = regions.filter { $0.rows.lowerBound <= start && $0.rows.upperBound >= end }.map(\.cols)
            let gaps = Self.complement(Self.union(covering), in: 0..<cols)
            if gaps == open.map({ $0.cols }) && openEnd == start {
                openEnd = end
                continue
            }
            result += open.map { LayerRegion(rows: $0.rowStart..<openEnd, cols: $0.cols) }
            open = gaps.map { ($0, start) }
            openEnd = end
        }
        result += open.map { LayerRegion(rows: $0.rowStart..<openEnd, cols: $0.cols) }
        return result
    }

    /// The covered entries as disjoint rectangles, in a canonical order that depends only on
    /// the regions: the layer is cut into bands of rows between consecutive block edges, each
    /// band's covered columns are merged into ranges, and neighbouring bands with the same
    /// ranges merge into one rectangle; rectangles come band by band, left to right. Every
    /// region lies, within a band, inside exactly one of the band's rectangles (so a rectangle
    /// never cuts a region's columns). A whole-layer region gives the whole layer.
    ///
    /// A worker sends exactly these rectangles of its share (each entry once, however many of
    /// its files overlap there), and the coordinator expects exactly these from it.
    public var disjointCover: [LayerRegion] {
        guard rows > 0, cols > 0 else { return [] }
        var edges = Set<Int>()
        for region in regions { edges.insert(region.rows.lowerBound); edges.insert(region.rows.upperBound) }
        let sortedEdges = edges.sorted()
        var result: [LayerRegion] = []
        var open: [Range<Int>] = []   // covered column ranges of the band run so far
        var openStart = 0
        var openEnd = 0
        func close() { result += open.map { LayerRegion(rows: openStart..<openEnd, cols: $0) } }
        for (start, end) in zip(sortedEdges, sortedEdges.dropFirst()) {
            let covered = Self.union(regions.filter { $0.rows.lowerBound <= start && $0.rows.upperBound >= end }.map(\.cols))
            if covered == open && openEnd == start {
                openEnd = end
                continue
            }
            close()
            (open, openStart, openEnd) = (covered, start, end)
        }
        close()
        return result
    }

    /// "rows 0..<4, cols 8..<16; rows 4..<8, cols 0..<16" (the first `limit` rectangles).
    public func describeUncovered(limit: Int = 8) -> String {
        let gaps = uncovered
        let shown = gaps.prefix(limit).map(\.description).joined(separator: "; ")
        let entries = gaps.reduce(0) { $0 + $1.elementCount }
        return shown + (gaps.count > limit ? "; … (\(gaps.count) rectangles)" : "") + " — \(entries) of \(rows * cols) entries"
    }

    /// Sorted disjoint ranges covering the same integers as `ranges`.
    public static func union(_ ranges: [Range<Int>]) -> [Range<Int>] {
        var merged: [Range<Int>] = []
        for range in ranges.filter({ !$0.isEmpty }).sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = merged.last, range.lowerBound <= last.upperBound {
                merged[merged.count - 1] = last.lowerBound..<Swift.max(last.upperBound, range.upperBound)
            } else {
                merged.append(range)
            }
        }
        return merged
    }

    /// The parts of `whole` outside sorted disjoint `ranges`.
    static func complement(_ ranges: [Range<Int>], in whole: Range<Int>) -> [Range<Int>] {
        var gaps: [Range<Int>] = []
        var next = whole.lowerBound
        for range in ranges {
            if range.lowerBound > next { gaps.append(next..<range.lowerBound) }
            next = Swift.max(next, range.upperBound)
        }
        if next < whole.upperBound { gaps.append(next..<whole.upperBound) }
        return gaps
    }
}
