import Foundation
import LoRAGACore

/// The block convention for gradient files: the safetensors metadata key `lora_ga.blocks` holds
/// a JSON object (as a string) `{"<tensor>": {"shape": [OUT, IN], "offset": [ROW0, COL0]}, ...}`.
/// A listed tensor holds the block G[ROW0 ..< ROW0 + rows, COL0 ..< COL0 + cols] of a layer of
/// full shape [OUT, IN]; a tensor not listed is a whole layer.
public enum GradientBlocks {
    public static let metadataKey = "lora_ga.blocks"

    /// Where one tensor of a file sits in its layer.
    public struct Declaration: Sendable, Hashable {
        /// The layer's full shape [OUT, IN].
        public var fullRows: Int
        public var fullCols: Int
        public var rowOffset: Int
        public var colOffset: Int

        public init(fullRows: Int, fullCols: Int, rowOffset: Int, colOffset: Int) {
            self.fullRows = fullRows
            self.fullCols = fullCols
            self.rowOffset = rowOffset
            self.colOffset = colOffset
        }
    }

    /// The metadata value for `blocks` (tensor name → declaration), for writers and tests.
    public static func metadataValue(_ blocks: [String: Declaration]) -> String {
        let object = blocks.mapValues { ["shape": [$0.fullRows, $0.fullCols], "offset": [$0.rowOffset, $0.colOffset]] }
        let data = try! JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
        return String(decoding: data, as: UTF8.self)
    }

    /// The declarations of `file`, validated against its tensors: each names a 2-D tensor the
    /// file holds, whose shape placed at its offset lies inside the declared full shape.
    /// - Throws: `GradientSetError` naming the file and the tensor.
    public static func declarations(in file: SafeTensorsFile) throws -> [String: Declaration] {
        guard let text = file.metadata[metadataKey] else { return [:] }
        func fail(_ problem: String) -> GradientSetError {
            GradientSetError("\(file.path): metadata \"\(metadataKey)\" \(problem)")
        }
        let parsed: Any
        do {
            parsed = try JSONSerialization.jsonObject(with: Data(text.utf8))
        } catch {
            throw fail("is not valid JSON (\(error.localizedDescription)); expected {\"<tensor>\": {\"shape\": [OUT, IN], \"offset\": [ROW0, COL0]}, ...}")
        }
        guard let object = parsed as? [String: Any] else {
            throw fail("is not a JSON object; expected {\"<tensor>\": {\"shape\": [OUT, IN], \"offset\": [ROW0, COL0]}, ...}")
        }
        var result: [String: Declaration] = [:]
        for name in object.keys.sorted() {
            func bad(_ problem: String) -> GradientSetError { fail("entry '\(name)' \(problem)") }
            guard let entry = object[name] as? [String: Any] else {
                throw bad("is not an object with \"shape\" and \"offset\"")
            }
            if let extra = entry.keys.sorted().first(where: { $0 != "shape" && $0 != "offset" }) {
                throw bad("has an unknown key \"\(extra)\" (only \"shape\" and \"offset\")")
            }
            guard let shape = integerPair(entry["shape"]), shape.0 > 0, shape.1 > 0 else {
                throw bad("needs \"shape\": [OUT, IN], two positive integers (got \(describe(entry["shape"])))")
            }
            guard let offset = integerPair(entry["offset"]), offset.0 >= 0, offset.1 >= 0 else {
                throw bad("needs \"offset\": [ROW0, COL0], two non-negative integers (got \(describe(entry["offset"])))")
            }
            guard let info = file.tensor(named: name) else {
                throw bad("names a tensor the file does not hold")
            }
            guard info.shape.count == 2 else {
                throw bad("names a tensor of shape \(info.shape); a block is 2-D [rows, cols]")
            }
            let rowEnd = offset.0 + info.shape[0], colEnd = offset.1 + info.shape[1]
            guard rowEnd <= shape.0, colEnd <= shape.1 else {
                throw bad("places a [\(info.shape[0]), \(info.shape[1])] block at offset [\(offset.0), \(offset.1)], which reaches [\(rowEnd), \(colEnd)], outside the full shape [\(shape.0), \(shape.1)]")
            }
            result[name] = Declaration(fullRows: shape.0, fullCols: shape.1, rowOffset: offset.0, colOffset: offset.1)
        }
        return result
    }

    /// Two JSON integers (not floats, not booleans): decoded as `[Int]` by `JSONDecoder`, which
    /// refuses both.
    private static func integerPair(_ value: Any?) -> (Int, Int)? {
        guard let value, let data = try? JSONSerialization.data(withJSONObject: [value]),
              let decoded = try? JSONDecoder().decode([[Int]].self, from: data), decoded.count == 1, decoded[0].count == 2 else { return nil }
        return (decoded[0][0], decoded[0][1])
    }

    private static func describe(_ value: Any?) -> String {
        guard let value else { return "nothing" }
        if let data = try? JSONSerialization.data(withJSONObject: [value]) {
            return String(String(decoding: data, as: UTF8.self).dropFirst().dropLast())
        }
        return "\(value)"
    }
}

/// One tensor of one file adding into a layer: a whole layer or a block of it.
public struct GradientContribution {
    public let file: SafeTensorsFile
    /// The tensor's name in `file` (the layer's name).
    public let tensor: String
    /// Where the tensor's values sit in the layer.
    public let region: LayerRegion
    /// False for a tensor listed in `lora_ga.blocks` (even one that spans the whole layer).
    public let isWholeLayer: Bool

    public init(file: SafeTensorsFile, tensor: String, region: LayerRegion, isWholeLayer: Bool) {
        self.file = file
        self.tensor = tensor
        self.region = region
        self.isWholeLayer = isWholeLayer
    }

    /// "path (whole layer)" or "path (block rows 0..<4, cols 8..<16)".
    public var description: String {
        file.path + (isWholeLayer ? " (whole layer)" : " (block \(region))")
    }
}
