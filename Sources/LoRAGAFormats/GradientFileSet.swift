import Foundation
import LoRAGACore

/// A layer as gradient files describe it: a 2-D tensor [out, in] present in every file.
public struct GradientLayer: Sendable, Hashable, Codable {
    /// The tensor name, e.g. `encoder.layer.0.attention.self.query.weight`.
    public var name: String
    public var rows: Int
    public var cols: Int
    /// Stored dtype name (F32, BF16, F16, F64).
    public var dtype: String

    public init(name: String, rows: Int, cols: Int, dtype: String) {
        self.name = name
        self.rows = rows
        self.cols = cols
        self.dtype = dtype
    }

    /// PEFT's module name: the tensor name without its `.weight` suffix.
    public var moduleName: String {
        name.hasSuffix(".weight") ? String(name.dropLast(".weight".count)) : name
    }
}

/// A problem with the set of gradient files as a whole.
public struct GradientSetError: Error, CustomStringConvertible {
    public let problem: String
    public init(_ problem: String) { self.problem = problem }
    public var description: String { problem }
}

/// Every safetensors file under the given paths, each one worker's or one micro-batch's
/// gradient. Tensors with the same name across files are summed; the layers are the 2-D
/// float tensors (matching an optional pattern) that every file holds with one shape and dtype.
public final class GradientFileSet {
    public let files: [SafeTensorsFile]
    /// Layers in a stable order: sorted by name.
    public let layers: [GradientLayer]

    /// - Parameters:
    ///   - paths: files, or directories searched recursively for `*.safetensors`.
    ///   - target: keep only layers whose name matches (a regular expression, searched anywhere in the name).
    public init(paths: [String], target: String? = nil) throws {
        let filePaths = try GradientFileSet.expand(paths)
        guard !filePaths.isEmpty else {
            throw GradientSetError("no .safetensors files found under \(paths.joined(separator: ", "))")
        }
        let files = try filePaths.map { try SafeTensorsFile(path: $0) }
        self.files = files
        let pattern: NSRegularExpression?
        do {
            pattern = try target.map { try NSRegularExpression(pattern: $0) }
        } catch {
            throw GradientSetError("--target '\(target ?? "")' is not a valid regular expression: \(error.localizedDescription)")
        }
        func wanted(_ info: TensorInfo) -> Bool {
            guard info.shape.count == 2, info.dtype.isReadableAsFloat else { return false }
            guard let pattern else { return true }
            return pattern.firstMatch(in: info.name, range: NSRange(info.name.startIndex..., in: info.name)) != nil
        }
        let first = files[0]
        var layers: [GradientLayer] = []
        for info in first.tensors where wanted(info) {
            for other in files.dropFirst() {
                guard let match = other.tensor(named: info.name) else {
                    throw GradientSetError("layer '\(info.name)' is in \(first.path) but missing from \(other.path); every gradient file must hold the same layers")
                }
                guard match.shape == info.shape else {
                    throw GradientSetError("layer '\(info.name)' has shape \(info.shape) in \(first.path) but \(match.shape) in \(other.path)")
                }
                guard match.dtype == info.dtype else {
                    throw GradientSetError("layer '\(info.name)' is \(info.dtype) in \(first.path) but \(match.dtype) in \(other.path)")
                }
            }
            layers.append(GradientLayer(name: info.name, rows: info.shape[0], cols: info.shape[1], dtype: info.dtype.rawValue))
        }
        for other in files.dropFirst() {
            for info in other.tensors where wanted(info) && first.tensor(named: info.name) == nil {
                throw GradientSetError("layer '\(info.name)' is in \(other.path) but missing from \(first.path); every gradient file must hold the same layers")
            }
        }
        guard !layers.isEmpty else {
            throw GradientSetError(target == nil
                ? "no 2-D float tensors in \(first.path)"
                : "no 2-D float tensor matches --target '\(target!)' in \(first.path)")
        }
        self.layers = layers
    }

    /// Files as given, and every `*.safetensors` below a directory, sorted for a stable order.
    public static func expand(_ paths: [String]) throws -> [String] {
        var result: [String] = []
        for path in paths {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
                throw GradientSetError("\(path): no such file or directory")
            }
            if isDirectory.boolValue {
                guard let walker = FileManager.default.enumerator(atPath: path) else {
                    throw GradientSetError("\(path): cannot list directory")
                }
                var found: [String] = []
                while let relative = walker.nextObject() as? String {
                    if relative.hasSuffix(".safetensors") { found.append((path as NSString).appendingPathComponent(relative)) }
                }
                guard !found.isEmpty else {
                    throw GradientSetError("\(path): the directory holds no .safetensors files (a gradient directory must contain at least one)")
                }
                result.append(contentsOf: found.sorted())
            } else {
                result.append(path)
            }
        }
        return result
    }

    /// Row blocks of `layer` summed over every file, sized for products with `productWidth`-wide
    /// operands (see `RowBlock.rowsPerProductBlock(cols:productWidth:minimumRows:)`).
    public func rowBlocks(of layer: GradientLayer, productWidth: Int, minimumRows: Int = 64) -> SummedRowBlocks {
        SummedRowBlocks(files: files, layer: layer,
                        blockRows: RowBlock.rowsPerProductBlock(cols: layer.cols, productWidth: productWidth, minimumRows: minimumRows))
    }

    /// Rows `range` of `layer` summed over every file into `destination` (rows × cols floats),
    /// checked for NaN/Inf (an error names the file, layer and row).
    public func readSummedRows(of layer: GradientLayer, rows range: Range<Int>, into destination: Slice<UnsafeMutableBufferPointer<Float>>) throws {
        precondition(destination.count == range.count * layer.cols && range.upperBound <= layer.rows,
                     "\(destination.count) floats for rows \(range) of \(layer.rows)×\(layer.cols)")
        try SummedRowBlocks.fill(UnsafeMutableBufferPointer(rebasing: destination), files: files, layer: layer, rows: range)
    }

    /// Row blocks of `layer` summed over every file, 128 rows (at most 16 MB) each: for
    /// streaming passes with no wide operand (verification, dense accumulation, shards a worker sends).
    public func rowBlocks(of layer: GradientLayer) -> SummedRowBlocks {
        SummedRowBlocks(files: files, layer: layer, blockRows: Swift.min(128, SummedRowBlocks.blockRows(cols: layer.cols, targetBytes: 16 << 20)))
    }
}

/// A layer's gradient summed over several files, handed out in row blocks: the first file
/// is read into the block buffer, the others are added onto it (no second buffer).
/// Memory is one block, however large the layer.
public struct SummedRowBlocks: RowBlockSource {
    public let files: [SafeTensorsFile]
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
    /// skip the NaN/Inf scan (3 % of a power pass); a file changed under a running job still
    /// shows up, less precisely, as a non-finite product (RangeFinder checks every product).
    private var scannedEveryRow = false

    public init(files: [SafeTensorsFile], layer: GradientLayer, blockRows: Int) {
        self.files = files
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

    /// Row blocks in order. The next block is read on a helper thread while `body` works on
    /// the current one, so reading (page cache: ~3 GB/s) hides behind the GEMMs.
    public mutating func forEachRowBlock(_ body: (RowBlock) throws -> Void) throws {
        let ranges = stride(from: 0, to: layer.rows, by: blockRows).map { $0..<Swift.min($0 + blockRows, layer.rows) }
        guard ranges.count > 1 else {
            if let only = ranges.first {
                var work = 0.0
                try withSummedRows(only) { block in
                    let started = ContinuousClock.now
                    try body(block)
                    work = (ContinuousClock.now - started).seconds
                }
                blockWorkSeconds += work
            }
            return
        }
        let reader = prefetcher ?? PrefetchingReader(files: files, layer: layer, blockElements: blockRows * layer.cols)
        prefetcher = reader
        let scan = !scannedEveryRow
        reader.start(ranges[0], slot: 0, scan: scan)
        for (position, range) in ranges.enumerated() {
            try reader.wait()
            let slot = position % 2
            if position + 1 < ranges.count { reader.start(ranges[position + 1], slot: 1 - slot, scan: scan) }
            do {
                let started = ContinuousClock.now
                try body(RowBlock(rowStart: range.lowerBound, rowCount: range.count, cols: layer.cols,
                                  values: UnsafeBufferPointer(rebasing: reader.buffers[slot][0..<(range.count * layer.cols)])))
                blockWorkSeconds += (ContinuousClock.now - started).seconds
            } catch {
                try? reader.wait()   // never leave the helper writing into a buffer we give up
                throw error
            }
            bytesRead += range.count * layer.cols * elementSize * files.count
        }
        scannedEveryRow = true
    }

    private var elementSize: Int { TensorDType(rawValue: layer.dtype)?.byteSize ?? 4 }

    /// Reads rows `range` (at most `blockRows`) summed over every file and passes them to `body`.
    /// A NaN/Inf is an error naming the file, layer and row.
    public mutating func withSummedRows<Result>(_ range: Range<Int>, _ body: (RowBlock) throws -> Result) throws -> Result {
        precondition(range.count <= blockRows && range.upperBound <= layer.rows, "rows \(range) exceed the block size \(blockRows) or the layer's \(layer.rows) rows")
        let (files, layer) = (self.files, self.layer)
        if buffer.count < blockRows * layer.cols { buffer = [Float](repeating: 0, count: blockRows * layer.cols) }
        let result = try buffer.withUnsafeMutableBufferPointer { whole in
            let block = UnsafeMutableBufferPointer(rebasing: whole[0..<(range.count * layer.cols)])
            try SummedRowBlocks.fill(block, files: files, layer: layer, rows: range)
            return try body(RowBlock(rowStart: range.lowerBound, rowCount: range.count, cols: layer.cols, values: UnsafeBufferPointer(block)))
        }
        bytesRead += range.count * layer.cols * elementSize * files.count
        return result
    }

    /// The sum over every file of rows `range`, into `block`; checks for NaN/Inf when `scan`.
    static func fill(_ block: UnsafeMutableBufferPointer<Float>, files: [SafeTensorsFile], layer: GradientLayer, rows range: Range<Int>, scan: Bool = true) throws {
        try files[0].readRows(layer.name, rows: range, into: block)
        guard scan else {
            for file in files.dropFirst() { try file.addRows(layer.name, rows: range, into: block) }
            return
        }
        try checkFinite(block, file: files[0], layer: layer, rowStart: range.lowerBound)
        for file in files.dropFirst() {
            try file.addRows(layer.name, rows: range, into: block)
        }
        // One check per file would need a second buffer; check the sum and, only
        // if it is bad, find the file that brought the bad value.
        if files.count > 1, (try? checkFinite(block, file: files[0], layer: layer, rowStart: range.lowerBound)) == nil {
            try locateNonFinite(files: files, layer: layer, rows: range)
        }
    }

    static func checkFinite(_ block: UnsafeMutableBufferPointer<Float>, file: SafeTensorsFile, layer: GradientLayer, rowStart: Int) throws {
        let view = RowBlock(rowStart: rowStart, rowCount: block.count / layer.cols, cols: layer.cols, values: UnsafeBufferPointer(block))
        if let index = view.firstNonFiniteIndex() {
            throw GradientError.nonFinite(layer: layer.name, source: file.path, row: rowStart + index / layer.cols)
        }
    }

    /// Re-reads the block file by file to name the one holding a NaN/Inf. Rare path.
    static func locateNonFinite(files: [SafeTensorsFile], layer: GradientLayer, rows: Range<Int>) throws {
        var scratch = [Float](repeating: 0, count: rows.count * layer.cols)
        for file in files {
            try scratch.withUnsafeMutableBufferPointer { block in
                try file.readRows(layer.name, rows: rows, into: block)
                try checkFinite(block, file: file, layer: layer, rowStart: rows.lowerBound)
            }
        }
        // Every file is finite but the sum overflowed Float32.
        throw GradientError.nonFinite(layer: layer.name, source: "sum of \(files.count) files", row: rows.lowerBound)
    }
}

/// Two block buffers and a helper thread that fills one while the caller uses the other.
/// Invariant: between `start` and the matching `wait`, only the helper touches the files and
/// the buffer being filled; the caller touches neither (hence `@unchecked Sendable`).
final class PrefetchingReader: @unchecked Sendable {
    let files: [SafeTensorsFile]
    let layer: GradientLayer
    let buffers: [UnsafeMutableBufferPointer<Float>]
    private let queue = DispatchQueue(label: "lora-ga.prefetch")
    private let group = DispatchGroup()
    private var failure: Error?

    init(files: [SafeTensorsFile], layer: GradientLayer, blockElements: Int) {
        self.files = files
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

    func start(_ range: Range<Int>, slot: Int, scan: Bool) {
        queue.async(group: group) {
            do {
                try SummedRowBlocks.fill(UnsafeMutableBufferPointer(rebasing: self.buffers[slot][0..<(range.count * self.layer.cols)]),
                                         files: self.files, layer: self.layer, rows: range, scan: scan)
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
