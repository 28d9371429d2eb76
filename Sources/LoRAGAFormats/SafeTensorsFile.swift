#if canImport(Glibc)
@preconcurrency import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A safetensors file opened for reading row blocks as `Float`.
///
/// Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian
/// header length N, N bytes of JSON header, then the data section that the
/// header's `data_offsets` index into. `init` validates the whole header; data
/// is then read with `pread` on demand through a bounded staging buffer (or mapped for
/// the length of one call, `withStoredRows`), so resident memory does not grow with the file.
///
/// Not `Sendable`: the staging buffer is reused across calls, so one instance
/// serves one thread at a time. Open one per thread to read in parallel.
public final class SafeTensorsFile {
    /// The path as given to `init`; every error message starts with it.
    public let path: String
    /// Tensor entries sorted by name, including those whose dtype cannot be read as `Float`.
    public let tensors: [TensorInfo]
    /// The header's `__metadata__` map (empty when absent).
    public let metadata: [String: String]
    /// Absolute file offset of the data section, 8 + N.
    public let dataSectionOffset: Int

    /// Upper bound on the staging buffer: larger requests are converted in chunks that stay
    /// in L2 between the read and the conversion (as fast as larger chunks, for less memory).
    static let stagingLimit = 512 << 10

    private let file: PosixFile
    private let indexByName: [String: Int]
    private var staging = UnsafeMutableRawBufferPointer(start: nil, count: 0)

    /// Opens `path` and validates its header.
    /// - Throws: `SafeTensorsError` naming the path and the problem.
    public init(path: String) throws {
        func fail(_ problem: String) -> SafeTensorsError { SafeTensorsError(path: path, problem: problem) }
        self.path = path
        let file: PosixFile
        do {
            file = try PosixFile.openForReading(path)
        } catch {
            throw fail("cannot open: \(error)")
        }
        self.file = file

        let fileSize: Int
        var lengthPrefix: UInt64 = 0
        do {
            fileSize = try file.size()
            guard fileSize >= 8 else {
                throw fail("file is \(fileSize) bytes, shorter than the 8-byte header length")
            }
            _ = try file.read(into: &lengthPrefix, count: 8, at: 0)
        } catch let error as SystemCallError {
            throw fail("cannot read header length: \(error)")
        }
        let headerLength = UInt64(littleEndian: lengthPrefix)
        // A safetensors file is an 8-byte length, then a JSON object: anything else (a text
        // file, another format) is named as such, not as a puzzling header length.
        var firstHeaderByte: UInt8 = 0
        if fileSize > 8 { _ = try? file.read(into: &firstHeaderByte, count: 1, at: 8) }
        let plausibleLength = headerLength <= UInt64(SafeTensorsHeader.maximumLength) && headerLength <= UInt64(fileSize - 8)
        guard plausibleLength || firstHeaderByte == UInt8(ascii: "{") else {
            let start = withUnsafeBytes(of: lengthPrefix) { String(decoding: $0.prefix(8).map { (32...126).contains($0) ? $0 : UInt8(ascii: ".") }, as: UTF8.self) }
            throw fail("not a safetensors file (it starts with \"\(start)\"; a safetensors file starts with an 8-byte header length and a JSON header)")
        }
        guard headerLength <= UInt64(SafeTensorsHeader.maximumLength) else {
            throw fail("header length \(headerLength) exceeds the limit of \(SafeTensorsHeader.maximumLength) bytes (100 MiB)")
        }
        guard headerLength <= UInt64(fileSize - 8) else {
            throw fail("header length \(headerLength) goes beyond the end of the file (\(fileSize) bytes)")
        }

        let length = Int(headerLength)
        var json = [UInt8](repeating: 0, count: length)
        do {
            let got = try json.withUnsafeMutableBytes { buffer in
                try file.read(into: buffer.baseAddress!, count: length, at: 8)
            }
            guard got == length else { throw fail("file shrank while reading its header") }
        } catch let error as SystemCallError {
            throw fail("cannot read header: \(error)")
        }

        dataSectionOffset = 8 + length
        let header = try SafeTensorsHeader(json: json, dataSectionSize: fileSize - dataSectionOffset, path: path)
        tensors = header.tensors
        metadata = header.metadata
        indexByName = Dictionary(uniqueKeysWithValues: tensors.enumerated().map { ($0.element.name, $0.offset) })
    }

    deinit {
        staging.deallocate()
    }

    /// The entry named `name`, or nil.
    public func tensor(named name: String) -> TensorInfo? {
        indexByName[name].map { tensors[$0] }
    }

    /// Reads rows `rows` of tensor `name` into the first `rows.count × columnCount`
    /// elements of `destination`, converted to `Float`.
    ///
    /// A row is a slice along the first dimension (`[out, in]` → `in` values);
    /// a 1-D tensor has one element per row.
    /// - Throws: `SafeTensorsError` for an unknown name, a dtype that is not a
    ///   float, rows outside the tensor, a destination too small, or an I/O failure.
    public func readRows(_ name: String, rows: Range<Int>, into destination: UnsafeMutableBufferPointer<Float>) throws {
        let (info, elements) = try rowElements(name, rows: rows, capacity: destination.count)
        try transfer(info, elements: elements, to: destination.baseAddress, accumulate: false)
    }

    /// Like `readRows`, but adds the converted values to `destination`: sums the
    /// same block of several workers' files without a second buffer.
    public func addRows(_ name: String, rows: Range<Int>, into destination: UnsafeMutableBufferPointer<Float>) throws {
        let (info, elements) = try rowElements(name, rows: rows, capacity: destination.count)
        try transfer(info, elements: elements, to: destination.baseAddress, accumulate: true)
    }

    /// Adds rows `rows` of tensor `name` (`columnCount` values each) into rows of a wider
    /// destination, row i of the request at `destination + i · rowStride`: a block of a layer
    /// added into a stripe of the layer at its column offset, without a second buffer.
    public func addRows(_ name: String, rows: Range<Int>, into destination: UnsafeMutablePointer<Float>, rowStride: Int) throws {
        let info = try readableTensor(name)
        let columns = info.columnCount
        precondition(rowStride >= columns, "row stride \(rowStride) is narrower than the \(columns) columns of '\(name)'")
        let (_, elements) = try rowElements(name, rows: rows, capacity: rows.count * columns)
        guard rowStride != columns else {
            try transfer(info, elements: elements, to: destination, accumulate: true)
            return
        }
        guard !rows.isEmpty, columns > 0 else { return }
        let size = info.dtype.byteSize
        let tensorStart = dataSectionOffset + info.dataOffsets.lowerBound
        let chunkRows = Swift.max(1, Self.stagingLimit / (columns * size))
        var next = rows.lowerBound
        while next < rows.upperBound {
            let count = Swift.min(chunkRows, rows.upperBound - next)
            let buffer = stagingBuffer(byteCount: count * columns * size)
            try readExactly(info, into: buffer, count: count * columns * size, at: tensorStart + next * columns * size)
            for row in 0..<count {
                FloatConversion.decode(buffer + row * columns * size, as: info.dtype, count: columns,
                                       into: destination + (next - rows.lowerBound + row) * rowStride, accumulate: true)
            }
            next += count
        }
    }

    /// Calls `body` with rows `rows` of tensor `name` as stored (the tensor's dtype, little
    /// endian), mapped read-only from the page cache — no copy — and with their absolute
    /// offset in the file. For senders that pass the stored bytes on unchanged (`sendfile`)
    /// and only need to look at them (hash, NaN check). The mapping lasts for the call.
    public func withStoredRows<T>(_ name: String, rows: Range<Int>, _ body: (_ bytes: UnsafeRawBufferPointer, _ fileOffset: Int) throws -> T) throws -> T {
        let info = try readableTensor(name)
        guard !info.shape.isEmpty else { throw fail("tensor '\(name)' is a scalar and has no rows; use readAll") }
        guard rows.lowerBound >= 0, rows.upperBound <= info.rowCount else {
            throw fail("rows \(rows.lowerBound)..<\(rows.upperBound) are outside tensor '\(name)' with \(info.rowCount) rows")
        }
        let size = info.dtype.byteSize
        let offset = dataSectionOffset + info.dataOffsets.lowerBound + rows.lowerBound * info.columnCount * size
        let count = rows.count * info.columnCount * size
        let mapped: (UnsafeRawBufferPointer) throws -> T = { try body($0, offset) }
        do {
            return try file.withMappedBytes(count: count, at: offset, mapped)
        } catch let error as SystemCallError {
            throw fail("cannot map rows \(rows.lowerBound)..<\(rows.upperBound) of tensor '\(name)': \(error)")
        }
    }

    /// Where tensor `name`'s first byte sits in the file (its rows follow contiguously).
    public func storedOffset(of name: String) throws -> Int {
        dataSectionOffset + (try readableTensor(name)).dataOffsets.lowerBound
    }

    /// A new descriptor for this open file (`dup`), which the caller owns and closes: for
    /// handing the file to `sendfile`. It reads the same file as this instance even if the
    /// path has since been replaced.
    public func duplicateDescriptor() throws -> Int32 {
        let descriptor = dup(file.descriptor)
        guard descriptor >= 0 else { throw fail("cannot duplicate its descriptor: \(SystemCallError(operation: "dup", code: errno))") }
        return descriptor
    }

    /// Reads a whole tensor of any rank, for small tensors (biases, norms, tests).
    public func readAll(_ name: String) throws -> [Float] {
        let info = try readableTensor(name)
        let count = info.elementCount
        return try [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            try transfer(info, elements: 0..<count, to: buffer.baseAddress, accumulate: false)
            initialized = count
        }
    }

    // MARK: - Internals

    private func fail(_ problem: String) -> SafeTensorsError {
        SafeTensorsError(path: path, problem: problem)
    }

    private func readableTensor(_ name: String) throws(SafeTensorsError) -> TensorInfo {
        guard let info = tensor(named: name) else { throw fail("no tensor named '\(name)'") }
        return info
    }

    /// Validates a row request and turns it into an element range.
    private func rowElements(_ name: String, rows: Range<Int>, capacity: Int) throws(SafeTensorsError) -> (TensorInfo, Range<Int>) {
        let info = try readableTensor(name)
        guard !info.shape.isEmpty else { throw fail("tensor '\(name)' is a scalar and has no rows; use readAll") }
        guard rows.lowerBound >= 0, rows.upperBound <= info.rowCount else {
            throw fail("rows \(rows.lowerBound)..<\(rows.upperBound) are outside tensor '\(name)' with \(info.rowCount) rows")
        }
        let columns = info.columnCount
        let elements = rows.lowerBound * columns..<rows.upperBound * columns
        guard capacity >= elements.count else {
            throw fail("destination holds \(capacity) floats but rows \(rows.lowerBound)..<\(rows.upperBound) of '\(name)' need \(elements.count)")
        }
        return (info, elements)
    }

    /// Reads elements `elements` of `info` and stores or adds them at `destination`,
    /// in chunks of at most `stagingLimit` bytes.
    private func transfer(_ info: TensorInfo, elements: Range<Int>, to destination: UnsafeMutablePointer<Float>?, accumulate: Bool) throws(SafeTensorsError) {
        guard !elements.isEmpty, let destination else { return }
        let size = info.dtype.byteSize
        let tensorStart = dataSectionOffset + info.dataOffsets.lowerBound

        #if _endian(little)
        // Little-endian F32 already is the destination's representation: skip the staging copy.
        if info.dtype == .f32 && !accumulate {
            try readExactly(info, into: UnsafeMutableRawPointer(destination), count: elements.count * size, at: tensorStart + elements.lowerBound * size)
            return
        }
        #endif

        let chunkElements = Self.stagingLimit / size
        var next = elements.lowerBound
        while next < elements.upperBound {
            let count = min(chunkElements, elements.upperBound - next)
            let buffer = stagingBuffer(byteCount: count * size)
            try readExactly(info, into: buffer, count: count * size, at: tensorStart + next * size)
            FloatConversion.decode(buffer, as: info.dtype, count: count, into: destination + (next - elements.lowerBound), accumulate: accumulate)
            next += count
        }
    }

    private func readExactly(_ info: TensorInfo, into buffer: UnsafeMutableRawPointer, count: Int, at offset: Int) throws(SafeTensorsError) {
        let got: Int
        do {
            got = try file.read(into: buffer, count: count, at: offset)
        } catch {
            throw fail("cannot read tensor '\(info.name)': \(error)")
        }
        guard got == count else { throw fail("file was truncated while reading tensor '\(info.name)'") }
    }

    /// Returns at least `byteCount` bytes of staging, growing (never shrinking) the buffer.
    private func stagingBuffer(byteCount: Int) -> UnsafeMutableRawPointer {
        if staging.count < byteCount {
            staging.deallocate()
            // 16-byte alignment suits every element type and vector loads.
            staging = .allocate(byteCount: byteCount, alignment: 16)
        }
        return staging.baseAddress!
    }
}
