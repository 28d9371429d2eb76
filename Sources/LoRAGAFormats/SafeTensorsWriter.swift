import Foundation
import LoRAGACore

/// Writes a safetensors file from `Float` data, streaming row blocks so a large
/// tensor never has to be held whole.
///
/// The header (sorted keys, space-padded to a multiple of 8 bytes) is written
/// up front from the declared shapes; data offsets are contiguous in declaration
/// order. Everything goes to `path + ".tmp"`, which `finish()` fsyncs and renames
/// onto `path`: a crash never leaves a half-written file under the final name.
///
/// ```swift
/// let writer = try SafeTensorsWriter(path: out, tensors: [.init(name: "w", dtype: .bf16, shape: [rows, cols])])
/// for block in blocks { try writer.write("w", rows: block.rows, values: block.values) }
/// try writer.finish()
/// ```
public final class SafeTensorsWriter {
    /// A tensor to be written: its name, stored dtype and shape.
    public struct TensorSpec: Sendable, Hashable {
        public var name: String
        /// F32, BF16 or F16 (`TensorDType.isWritableFromFloat`).
        public var dtype: TensorDType
        public var shape: [Int]

        public init(name: String, dtype: TensorDType, shape: [Int]) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
        }
    }

    /// Upper bound on the conversion buffer: larger blocks are converted in chunks.
    static let stagingLimit = 4 << 20

    public let path: String
    private let temporaryPath: String
    private var file: PosixFile?
    private let layout: [TensorInfo]
    private let indexByName: [String: Int]
    private let dataSectionOffset: Int
    /// Next row each tensor expects: rows of one tensor arrive in order, tensors may interleave.
    private var nextRow: [Int]
    private var staging = UnsafeMutableRawBufferPointer(start: nil, count: 0)

    /// Validates `tensors`, creates `path + ".tmp"` and writes the header.
    /// - Throws: `SafeTensorsError` for a dtype that cannot be written, a negative
    ///   dimension, a duplicate or reserved name, or an I/O failure.
    public init(path: String, tensors: [TensorSpec], metadata: [String: String] = [:]) throws {
        func fail(_ problem: String) -> SafeTensorsError { SafeTensorsError(path: path, problem: problem) }
        self.path = path
        temporaryPath = path + ".tmp"

        var layout: [TensorInfo] = []
        var offset = 0
        for spec in tensors {
            guard spec.dtype.isWritableFromFloat else {
                throw fail("tensor '\(spec.name)': dtype \(spec.dtype) cannot be written from Float (use F32, BF16 or F16)")
            }
            guard spec.name != SafeTensorsHeader.metadataKey else {
                throw fail("'\(spec.name)' is reserved for metadata and cannot name a tensor")
            }
            guard spec.shape.allSatisfy({ $0 >= 0 }) else {
                throw fail("tensor '\(spec.name)' has a negative dimension in shape \(spec.shape)")
            }
            var bytes = spec.dtype.byteSize
            var overflow = false
            for dimension in spec.shape where !overflow {
                (bytes, overflow) = bytes.multipliedReportingOverflow(by: dimension)
            }
            guard !overflow, offset <= Int.max - bytes else {
                throw fail("tensor '\(spec.name)' with shape \(spec.shape) is too large")
            }
            layout.append(TensorInfo(name: spec.name, dtype: spec.dtype, shape: spec.shape, dataOffsets: offset..<offset + bytes))
            offset += bytes
        }
        var indexByName: [String: Int] = [:]
        for (index, info) in layout.enumerated() {
            guard indexByName.updateValue(index, forKey: info.name) == nil else {
                throw fail("tensor '\(info.name)' is declared twice")
            }
        }
        self.layout = layout
        self.indexByName = indexByName
        nextRow = Array(repeating: 0, count: layout.count)

        let header = try Self.encodeHeader(layout, metadata: metadata, path: path)
        dataSectionOffset = header.count

        do {
            let file = try PosixFile.createForWriting(temporaryPath)
            self.file = file
            try header.withUnsafeBytes { bytes in
                try file.write(from: bytes.baseAddress!, count: bytes.count, at: 0)
            }
        } catch {
            throw fail("cannot write \(temporaryPath): \(error)")
        }
    }

    deinit {
        staging.deallocate()
        // Not finished: drop the partial temp file rather than leave debris.
        if file != nil {
            file = nil
            PosixFile.removeQuietly(temporaryPath)
        }
    }

    /// Writes rows `rows` of tensor `name` from `values`, which must hold exactly
    /// `rows.count × columnCount` floats; each tensor's rows must arrive in order.
    public func write(_ name: String, rows: Range<Int>, values: UnsafeBufferPointer<Float>) throws {
        guard let file else { throw fail("writer is already finished") }
        guard let index = indexByName[name] else { throw fail("no tensor named '\(name)' was declared") }
        let info = layout[index]
        guard rows.lowerBound == nextRow[index] else {
            throw fail("tensor '\(name)': rows must be written in order; expected row \(nextRow[index]) next, got \(rows.lowerBound)")
        }
        guard rows.upperBound <= info.rowCount else {
            throw fail("tensor '\(name)': rows \(rows.lowerBound)..<\(rows.upperBound) exceed its \(info.rowCount) rows")
        }
        let columns = info.columnCount
        guard values.count == rows.count * columns else {
            throw fail("tensor '\(name)': rows \(rows.lowerBound)..<\(rows.upperBound) need \(rows.count * columns) values, got \(values.count)")
        }

        let size = info.dtype.byteSize
        var start = dataSectionOffset + info.dataOffsets.lowerBound + rows.lowerBound * columns * size
        do {
            guard let source = values.baseAddress else { nextRow[index] = rows.upperBound; return }
            let chunkElements = Self.stagingLimit / size
            var done = 0
            while done < values.count {
                let count = min(chunkElements, values.count - done)
                let buffer = stagingBuffer(byteCount: count * size)
                FloatConversion.encode(source + done, count: count, as: info.dtype, into: buffer)
                try file.write(from: buffer, count: count * size, at: start)
                done += count
                start += count * size
            }
        } catch {
            throw fail("cannot write \(temporaryPath): \(error)")
        }
        nextRow[index] = rows.upperBound
    }

    /// Checks every tensor is complete, fsyncs, and renames the temp file onto `path`.
    public func finish() throws {
        guard file != nil else { throw fail("writer is already finished") }
        for (index, info) in layout.enumerated() where nextRow[index] < info.rowCount {
            throw fail("tensor '\(info.name)' is incomplete: \(nextRow[index]) of \(info.rowCount) rows written")
        }
        do {
            try file?.sync()
            file = nil  // closes the descriptor before publishing
            try PosixFile.publish(temporaryPath, as: path)
        } catch {
            PosixFile.removeQuietly(temporaryPath)
            throw fail("cannot finish: \(error)")
        }
    }

    /// Writes whole tensors in one call; each `values` holds its tensor row-major.
    public static func write(
        path: String, tensors: [(spec: TensorSpec, values: [Float])], metadata: [String: String] = [:]
    ) throws {
        let writer = try SafeTensorsWriter(path: path, tensors: tensors.map(\.spec), metadata: metadata)
        for (spec, values) in tensors {
            let rows = spec.shape.first ?? 1
            try values.withUnsafeBufferPointer { try writer.write(spec.name, rows: 0..<rows, values: $0) }
        }
        try writer.finish()
    }

    // MARK: - Internals

    private func fail(_ problem: String) -> SafeTensorsError {
        SafeTensorsError(path: path, problem: problem)
    }

    /// Length prefix + JSON header with sorted keys, space-padded so the data
    /// section starts 8-byte aligned (as the reference writer does).
    private static func encodeHeader(_ layout: [TensorInfo], metadata: [String: String], path: String) throws(SafeTensorsError) -> [UInt8] {
        var object: [String: Any] = [:]
        for info in layout {
            object[info.name] = [
                "dtype": info.dtype.rawValue,
                "shape": info.shape,
                "data_offsets": [info.dataOffsets.lowerBound, info.dataOffsets.upperBound],
            ] as [String: Any]
        }
        if !metadata.isEmpty { object[SafeTensorsHeader.metadataKey] = metadata }
        var json: [UInt8]
        do {
            json = Array(try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]))
        } catch {
            throw SafeTensorsError(path: path, problem: "cannot encode header: \(error)")
        }
        json.append(contentsOf: repeatElement(UInt8(ascii: " "), count: (8 - json.count % 8) % 8))
        return withUnsafeBytes(of: UInt64(json.count).littleEndian, Array.init) + json
    }

    private func stagingBuffer(byteCount: Int) -> UnsafeMutableRawPointer {
        if staging.count < byteCount {
            staging.deallocate()
            staging = .allocate(byteCount: byteCount, alignment: 16)
        }
        return staging.baseAddress!
    }
}
