import Foundation
import LoRAGACore

/// A layer as gradient files describe it: a 2-D tensor [out, in] present in every file.
public struct GradientLayer: Sendable, Hashable, Codable {
    /// The tensor name, e.g. `encoder.layer.0.attention.self.query.weight`.
    public var name: String
    public var rows: Int
    public var cols: Int
    /// The dtype the files store it in.
    public var dtype: TensorDType

    public init(name: String, rows: Int, cols: Int, dtype: TensorDType) {
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

/// What to do with entries of a layer that no gradient file covers (blocks leave a hole).
public enum UncoveredEntries: Sendable {
    /// An error naming the layer and the uncovered rectangles (the default: a missing shard
    /// is far more likely than a gradient that is truly zero there).
    case refused
    /// They count as zeros (`--allow-uncovered`; and a worker, which holds its share only).
    case zero
}

/// Every safetensors file under the given paths, each one worker's or one micro-batch's
/// gradient, or one training rank's blocks. Tensors with the same name across files add, each
/// at its place: a tensor listed in the file's `lora_ga.blocks` metadata is a block of its layer
/// (``GradientBlocks``), any other is a whole layer. The layers are the 2-D float tensors
/// (matching an optional pattern); every contribution to a layer agrees on its full shape and
/// dtype. Without blocks, every file must hold every layer; with blocks, every entry of every
/// layer must be covered by some contribution (unless `uncovered` is `.zero`).
public final class GradientFileSet {
    public let files: [SafeTensorsFile]
    /// Layers in a stable order: sorted by name.
    public let layers: [GradientLayer]
    /// True when some file declares blocks (`lora_ga.blocks`).
    public let hasBlocks: Bool
    private let contributionsByLayer: [String: [GradientContribution]]

    /// - Parameters:
    ///   - paths: files, or directories searched recursively for `*.safetensors`.
    ///   - target: keep only layers whose name matches (a regular expression, searched anywhere in the name).
    ///   - uncovered: whether entries no block covers are an error or zeros.
    public init(paths: [String], target: String? = nil, uncovered: UncoveredEntries = .refused) throws {
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
            guard info.shape.count == 2 else { return false }
            guard let pattern else { return true }
            return pattern.firstMatch(in: info.name, range: NSRange(info.name.startIndex..., in: info.name)) != nil
        }
        let declarations = try files.map { try GradientBlocks.declarations(in: $0) }
        let hasBlocks = files.contains { $0.metadata[GradientBlocks.metadataKey] != nil }
        self.hasBlocks = hasBlocks

        // Per layer: its shape and dtype as the first contribution gave them, and every contribution.
        var found: [String: (layer: GradientLayer, first: GradientContribution, contributions: [GradientContribution])] = [:]
        for (file, blocks) in zip(files, declarations) {
            for info in file.tensors where wanted(info) {
                let block = blocks[info.name]
                let (rows, cols) = block.map { ($0.fullRows, $0.fullCols) } ?? (info.shape[0], info.shape[1])
                let region = block.map { LayerRegion(rows: $0.rowOffset..<($0.rowOffset + info.shape[0]), cols: $0.colOffset..<($0.colOffset + info.shape[1])) }
                    ?? LayerRegion(wholeOf: rows, cols)
                let contribution = GradientContribution(file: file, tensor: info.name, region: region, isWholeLayer: block == nil)
                guard var entry = found[info.name] else {
                    found[info.name] = (GradientLayer(name: info.name, rows: rows, cols: cols, dtype: info.dtype), contribution, [contribution])
                    continue
                }
                guard entry.layer.rows == rows, entry.layer.cols == cols else {
                    let shape = hasBlocks ? "full shape" : "shape"
                    throw GradientSetError("layer '\(info.name)' has \(shape) [\(entry.layer.rows), \(entry.layer.cols)] in \(entry.first.description) but [\(rows), \(cols)] in \(contribution.description)")
                }
                guard entry.layer.dtype == info.dtype else {
                    throw GradientSetError("layer '\(info.name)' is \(entry.layer.dtype) in \(entry.first.file.path) but \(info.dtype) in \(file.path)")
                }
                entry.contributions.append(contribution)
                found[info.name] = entry
            }
        }
        guard !found.isEmpty else {
            throw GradientSetError(target == nil
                ? "no 2-D float tensors in \(files.map(\.path).joined(separator: ", "))"
                : "no 2-D float tensor matches --target '\(target!)' in \(files.map(\.path).joined(separator: ", "))")
        }
        let names = found.keys.sorted()
        if !hasBlocks {
            // Whole layers only: a file missing a layer is a broken recording, not a block.
            for name in names where found[name]!.contributions.count != files.count {
                let holders = Set(found[name]!.contributions.map { ObjectIdentifier($0.file) })
                let missing = files.first { !holders.contains(ObjectIdentifier($0)) }!
                throw GradientSetError("layer '\(name)' is in \(found[name]!.first.file.path) but missing from \(missing.path); every gradient file must hold the same layers (a file holding blocks of layers says so in its \"\(GradientBlocks.metadataKey)\" metadata)")
            }
        } else if uncovered == .refused {
            for name in names {
                let (layer, _, contributions) = found[name]!
                let coverage = LayerCoverage(rows: layer.rows, cols: layer.cols, regions: contributions.map(\.region))
                guard coverage.isComplete else {
                    throw GradientSetError("layer '\(name)' [\(layer.rows), \(layer.cols)] is not covered by its \(contributions.count) block(s): no gradient file holds \(coverage.describeUncovered()); pass --allow-uncovered to count those entries as zeros")
                }
            }
        }
        self.layers = names.map { found[$0]!.layer }
        self.contributionsByLayer = found.mapValues { $0.contributions }
    }

    /// The tensors adding into `layer`, in file order.
    public func contributions(of layer: GradientLayer) -> [GradientContribution] {
        contributionsByLayer[layer.name] ?? []
    }

    /// Which entries of `layer` these files cover.
    public func coverage(of layer: GradientLayer) -> LayerCoverage {
        LayerCoverage(rows: layer.rows, cols: layer.cols, regions: contributions(of: layer).map(\.region))
    }

    /// The file holding `layer` whole when that is its only contribution: its stored rows are
    /// the layer's rows (nothing to sum or place), which senders can pass on unchanged.
    public func soleWholeFile(of layer: GradientLayer) -> SafeTensorsFile? {
        let contributions = contributions(of: layer)
        guard contributions.count == 1, contributions[0].isWholeLayer || contributions[0].region == LayerRegion(wholeOf: layer.rows, layer.cols) else { return nil }
        return contributions[0].file
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
        rowBlocks(of: layer, blockRows: RowBlock.rowsPerProductBlock(cols: layer.cols, productWidth: productWidth, minimumRows: minimumRows))
    }

    /// Row blocks of `layer` summed over every file, `blockRows` rows each.
    public func rowBlocks(of layer: GradientLayer, blockRows: Int) -> SummedRowBlocks {
        SummedRowBlocks(contributions: contributions(of: layer), layer: layer, blockRows: blockRows)
    }

    /// Rows `range` of `layer` summed over every file into `destination` (rows × cols floats),
    /// checked for NaN/Inf (an error names the file, layer and row).
    public func readSummedRows(of layer: GradientLayer, rows range: Range<Int>, into destination: Slice<UnsafeMutableBufferPointer<Float>>) throws {
        precondition(destination.count == range.count * layer.cols && range.upperBound <= layer.rows,
                     "\(destination.count) floats for rows \(range) of \(layer.rows)×\(layer.cols)")
        try SummedRowBlocks.fill(UnsafeMutableBufferPointer(rebasing: destination), contributions: contributions(of: layer), layer: layer,
                                 stripe: LayerRegion(rows: range, cols: 0..<layer.cols))
    }

    /// The rectangles of `layer` these files hold, each entry once, in the order a worker sends
    /// them (``LayerCoverage/disjointCover`` of its blocks): the whole layer when it holds it whole.
    public func parts(of layer: GradientLayer) -> [LayerRegion] {
        coverage(of: layer).disjointCover
    }

    /// Rectangle `region` of `layer` summed over every file into `destination`
    /// (`region.elementCount` floats, row-major, `region.cols.count` wide), checked for NaN/Inf.
    /// Every block must lie within the region's columns or miss them (true of each band of rows
    /// of a rectangle of ``parts(of:)``).
    public func readSummed(of layer: GradientLayer, region: LayerRegion, into destination: Slice<UnsafeMutableBufferPointer<Float>>) throws {
        precondition(destination.count == region.elementCount && region.rows.upperBound <= layer.rows && region.cols.upperBound <= layer.cols,
                     "\(destination.count) floats for \(region) of \(layer.rows)×\(layer.cols)")
        try SummedRowBlocks.fill(UnsafeMutableBufferPointer(rebasing: destination), contributions: contributions(of: layer), layer: layer, stripe: region)
    }

    /// Row blocks of `layer` summed over every file, 128 rows (at most 16 MB) each: for
    /// streaming passes with no wide operand (verification, dense accumulation, shards a worker sends).
    public func rowBlocks(of layer: GradientLayer) -> SummedRowBlocks {
        rowBlocks(of: layer, blockRows: Swift.min(128, SummedRowBlocks.blockRows(cols: layer.cols, targetBytes: 16 << 20)))
    }
}

extension GradientFileSet {
    /// `lora-ga inspect` on gradient files: per layer its shape, dtype, contributions (whole
    /// layers and blocks, with their rectangles) and coverage.
    public func report() -> String {
        var lines = [
            "gradients: \(files.count) files, \(layers.count) layers" + (hasBlocks ? ", blocks declared (\"\(GradientBlocks.metadataKey)\")" : ", whole layers only"),
            "| layer | shape | dtype | whole layers | blocks | coverage |",
            "|---|---|---|---|---|---|",
        ]
        var details: [String] = []
        for layer in layers {
            let contributions = contributions(of: layer)
            let coverage = coverage(of: layer)
            let whole = contributions.filter(\.isWholeLayer).count
            let state = coverage.isComplete ? "complete" : "UNCOVERED: " + coverage.describeUncovered()
            lines.append("| \(layer.name) | \(layer.rows)×\(layer.cols) | \(layer.dtype) | \(whole) | \(contributions.count - whole) | \(state) |")
            if whole < contributions.count {
                details.append("\(layer.name):")
                for contribution in contributions { details.append("  \(contribution.description)") }
            }
        }
        return (lines + (details.isEmpty ? [] : [""] + details)).joined(separator: "\n")
    }

    /// Layers with entries no contribution covers.
    public var uncoveredLayers: [GradientLayer] {
        layers.filter { !coverage(of: $0).isComplete }
    }
}
