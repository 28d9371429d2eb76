import Foundation
import LoRAGACore

/// The validated JSON header of a safetensors file.
///
/// Nothing in a header is trusted until every entry has been checked against
/// the data section it describes: a bad header must fail here with a message,
/// not later as a wild read or a huge allocation.
struct SafeTensorsHeader {
    /// Largest header accepted, as in the reference implementation: a bound on
    /// what a corrupt length prefix can make us allocate.
    static let maximumLength = 100 << 20

    /// Key reserved for the string→string metadata map.
    static let metadataKey = "__metadata__"

    /// Tensor entries of the dtypes lora-ga reads (``TensorDType``), sorted by name.
    let tensors: [TensorInfo]
    /// Tensors of the other safetensors dtypes (an `I64` step counter saved beside the
    /// gradients), name → dtype: validated like the rest, never read, never a layer.
    let otherTensors: [String: String]
    let metadata: [String: String]

    /// Bytes per element of the safetensors dtypes that lora-ga does not read. They are known
    /// only so that a file holding such a tensor opens and its offsets are checked.
    static let otherDTypeSizes: [String: Int] = [
        "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    ]

    /// Parses and validates `json` (the header bytes, space padding allowed)
    /// for a data section of `dataSectionSize` bytes.
    /// - Throws: `SafeTensorsError` naming `path` and the first problem found.
    init(json: [UInt8], dataSectionSize: Int, path: String) throws(SafeTensorsError) {
        func fail(_ problem: String) -> SafeTensorsError { SafeTensorsError(path: path, problem: problem) }

        guard String(validating: json, as: UTF8.self) != nil else {
            throw fail("header is not valid UTF-8")
        }
        let parsed: Any
        do {
            parsed = try JSONSerialization.jsonObject(with: Data(json), options: [.fragmentsAllowed])
        } catch {
            throw fail("header is not valid JSON")
        }
        guard let object = parsed as? [String: Any] else {
            throw fail("header is JSON but not an object (found \(Self.kind(of: parsed)))")
        }

        var metadata: [String: String] = [:]
        if let rawMetadata = object[Self.metadataKey] {
            guard let map = rawMetadata as? [String: Any] else {
                throw fail("\(Self.metadataKey) is not an object")
            }
            for (key, value) in map {
                guard let string = value as? String else {
                    throw fail("\(Self.metadataKey) entry '\(key)' is not a string")
                }
                metadata[key] = string
            }
        }

        // Sorted so that the first error reported does not depend on hashing.
        var tensors: [TensorInfo] = []
        var otherTensors: [String: String] = [:]
        var spans: [(name: String, offsets: Range<Int>)] = []
        for name in object.keys.sorted() where name != Self.metadataKey {
            let entry = try Self.tensor(named: name, entry: object[name]!, dataSectionSize: dataSectionSize, fail: fail)
            spans.append((name, entry.offsets))
            if let info = entry.info { tensors.append(info) } else { otherTensors[name] = entry.dtypeName }
        }
        try Self.checkNoOverlap(spans, fail: fail)
        self.tensors = tensors
        self.otherTensors = otherTensors
        self.metadata = metadata
    }

    /// Validates one tensor entry: dtype, shape, offsets and their agreement. `info` is nil
    /// for a dtype lora-ga does not read.
    private static func tensor(
        named name: String, entry: Any, dataSectionSize: Int, fail: (String) -> SafeTensorsError
    ) throws(SafeTensorsError) -> (info: TensorInfo?, dtypeName: String, offsets: Range<Int>) {
        guard let fields = entry as? [String: Any] else {
            throw fail("tensor '\(name)' is not a JSON object")
        }

        guard let rawDType = fields["dtype"] else { throw fail("tensor '\(name)' has no \"dtype\"") }
        guard let dtypeName = rawDType as? String else {
            throw fail("tensor '\(name)' has dtype \(describe(rawDType)), which is not a string")
        }
        let dtype = TensorDType(rawValue: dtypeName)
        guard let elementSize = dtype?.byteSize ?? otherDTypeSizes[dtypeName] else {
            throw fail("tensor '\(name)' has unknown dtype '\(dtypeName)'")
        }

        guard let rawShape = fields["shape"] else { throw fail("tensor '\(name)' has no \"shape\"") }
        guard let shapeEntries = rawShape as? [Any] else {
            throw fail("tensor '\(name)' has shape \(describe(rawShape)), which is not an array")
        }
        var shape: [Int] = []
        for entry in shapeEntries {
            guard let dimension = nonNegativeInteger(entry) else {
                throw fail("tensor '\(name)' has shape entry \(describe(entry)), which is not a non-negative integer")
            }
            shape.append(dimension)
        }

        guard let rawOffsets = fields["data_offsets"] else { throw fail("tensor '\(name)' has no \"data_offsets\"") }
        guard let offsetEntries = rawOffsets as? [Any], offsetEntries.count == 2,
              let begin = nonNegativeInteger(offsetEntries[0]), let end = nonNegativeInteger(offsetEntries[1])
        else {
            throw fail("tensor '\(name)' has data_offsets \(describe(rawOffsets)), which is not two non-negative integers")
        }
        guard begin <= end else {
            throw fail("tensor '\(name)' has data_offsets [\(begin), \(end)] with begin after end")
        }
        guard end <= dataSectionSize else {
            throw fail("tensor '\(name)' has data_offsets [\(begin), \(end)] beyond the data section (\(dataSectionSize) bytes)")
        }

        // Overflow-checked: a header may claim any shape.
        var elements = 1
        var overflow = false
        for dimension in shape where !overflow {
            (elements, overflow) = elements.multipliedReportingOverflow(by: dimension)
        }
        let (bytes, bytesOverflow) = elements.multipliedReportingOverflow(by: elementSize)
        guard !overflow, !bytesOverflow else {
            throw fail("tensor '\(name)' has shape \(shape) whose size in bytes overflows")
        }
        guard bytes == end - begin else {
            throw fail("tensor '\(name)' has shape \(shape) (\(elements) elements of \(dtypeName) = \(bytes) bytes) but data_offsets span \(end - begin) bytes")
        }
        return (dtype.map { TensorInfo(name: name, dtype: $0, shape: shape, dataOffsets: begin..<end) }, dtypeName, begin..<end)
    }

    /// Rejects two non-empty tensors sharing a byte: reads of one must never see the other.
    private static func checkNoOverlap(_ tensors: [(name: String, offsets: Range<Int>)], fail: (String) -> SafeTensorsError) throws(SafeTensorsError) {
        let byOffset = tensors.filter { !$0.offsets.isEmpty }.sorted { $0.offsets.lowerBound < $1.offsets.lowerBound }
        for (previous, next) in zip(byOffset, byOffset.dropFirst()) where next.offsets.lowerBound < previous.offsets.upperBound {
            throw fail("tensors '\(previous.name)' \(span(previous.offsets)) and '\(next.name)' \(span(next.offsets)) overlap")
        }
    }

    private static func span(_ offsets: Range<Int>) -> String {
        "[\(offsets.lowerBound), \(offsets.upperBound))"
    }

    /// A JSON integer in `0...Int.max`; booleans and numbers written with a
    /// fraction or exponent are refused, as the reference (serde `usize`) does.
    private static func nonNegativeInteger(_ value: Any) -> Int? {
        // `is Bool` also matches the numbers 0 and 1, so go by the parser's type code:
        // integers get an integer code, booleans "c", anything with a fraction or exponent "d".
        guard let number = value as? NSNumber, integerTypeCodes.contains(typeCode(number)) else { return nil }
        guard let integer = value as? Int, integer >= 0 else { return nil }
        return integer
    }

    private static let integerTypeCodes: Set<String> = ["C", "s", "S", "i", "I", "l", "L", "q", "Q"]

    private static func typeCode(_ number: NSNumber) -> String { String(cString: number.objCType) }

    private static func isBoolean(_ value: Any) -> Bool {
        (value as? NSNumber).map { typeCode($0) == "c" } ?? false
    }

    /// Short rendering of an untrusted JSON value for an error message.
    private static func describe(_ value: Any) -> String {
        switch value {
        case let string as String: "\"\(string.prefix(64))\""
        case let number as NSNumber: isBoolean(number) ? "\(number.boolValue)" : "\(number)"
        case let array as [Any]: "[" + array.prefix(8).map(describe).joined(separator: ", ") + (array.count > 8 ? ", …]" : "]")
        case is [String: Any]: "an object"
        case is NSNull: "null"
        default: "\(value)"
        }
    }

    private static func kind(of value: Any) -> String {
        switch value {
        case is [Any]: "an array"
        case is String: "a string"
        case let number as NSNumber: isBoolean(number) ? "a boolean" : "a number"
        case is NSNull: "null"
        default: "\(type(of: value))"
        }
    }
}
