import Foundation
import Logging
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import LoRAGADaemon

/// One shard of a layer read from this worker's files: its rows, and zstd-compressed when the job compresses.
struct EncodedShard: Sendable {
    var uncompressed: ByteBuffer
    var compressed: ByteBuffer?
    /// The rows as a gradient file stores them, sent from there with `sendfile`; `uncompressed`
    /// is then empty.
    var file: FileRegion?
    /// ``ShardChecksum`` of the payload as sent (`compressed` when there is one).
    var checksum: UInt64

    init(uncompressed: ByteBuffer, compressed: ByteBuffer? = nil, checksum: UInt64) {
        self.uncompressed = uncompressed
        self.compressed = compressed
        self.checksum = checksum
    }

    init(file: FileRegion, checksum: UInt64) {
        self.uncompressed = ByteBuffer()
        self.file = file
        self.checksum = checksum
    }
}

/// The worker's gradient files behind a lock: reads run on the worker's compute thread,
/// one at a time (file readers and the zstd context are not thread-safe).
final class GradientReader: @unchecked Sendable {
    let files: GradientFileSet
    private let lock = NIOLock()
    private var sources: [String: SummedRowBlocks] = [:]
    private let codec = ZstdCodec()
    /// The gradient file as `sendfile` reads it (a duplicate of its descriptor), opened on the
    /// first shard sent from it and closed with the reader.
    private var sendHandle: NIOFileHandle?
    /// Cleared when the file turns out not to support `sendfile` or `mmap` (probed before the
    /// first shard; some file systems support neither): shards are then read into buffers.
    private var sendsFromFile = true
    /// Told once when shards fall back to buffers.
    var logger: Logger?

    /// A worker holds its share of each layer: entries its files leave uncovered are zeros
    /// here, and other workers' blocks (whoever checks the whole job's coverage) cover them.
    init(paths: [String]) throws {
        files = try GradientFileSet(paths: paths, uncovered: .zero)
    }

    /// The part of `layer` this worker's files hold: the blocks' rectangles, the rows and
    /// columns they touch (`coveredRows`, `coveredCols`), and what they leave uncovered.
    func coverage(of layer: GradientLayer) -> LayerCoverage {
        files.coverage(of: layer)
    }

    deinit {
        try? sendHandle?.close()
    }

    var inputBytes: Int {
        files.files.reduce(0) { total, file in
            total + ((try? FileManager.default.attributesOfItem(atPath: file.path)[.size] as? Int) ?? 0)
        }
    }

    var announcement: [LayerInfo] {
        files.layers.map { layer in
            LayerInfo(name: layer.name, rows: UInt64(layer.rows), cols: UInt64(layer.cols),
                      sourceDType: layer.dtype,
                      regions: files.hasBlocks ? coverage(of: layer).regions : [])
        }
    }

    /// The rectangles of `layer` this worker sends, in order: the whole layer when its files
    /// hold it whole, else the disjoint cover of its blocks — what the coordinator derives from
    /// the same announcement and expects, so a worker's traffic is its share.
    func parts(of layer: GradientLayer) -> [LayerRegion] {
        files.hasBlocks ? files.parts(of: layer) : [LayerRegion(wholeOf: layer.rows, layer.cols)]
    }

    /// Power: the rows of the product this worker's share can make nonzero (its rows for the
    /// range side, its columns for the co-range side), as the coordinator expects them.
    func productSpans(of layer: GradientLayer, side: WirePowerSide) -> [Range<Int>] {
        let parts = parts(of: layer)
        return LayerCoverage.union(parts.map { side == .range ? $0.rows : $0.cols })
    }

    /// Forgets a finished layer's reader and buffers, so a worker's memory does not grow by one
    /// block set per layer over the job.
    func release(_ layer: GradientLayer) {
        lock.withLock { _ = sources.removeValue(forKey: layer.name) }
    }

    /// - Parameter productWidth: k of the power requests the source answers (sizes its blocks).
    private func withSource<T>(_ layer: GradientLayer, blockRows: Int? = nil, productWidth: Int? = nil, _ body: (inout SummedRowBlocks) throws -> T) rethrows -> T {
        try lock.withLock {
            // Take it out while in use: a copy left in the dictionary would make every block
            // write copy the whole buffer (copy-on-write; profiled at a third of the worker's CPU).
            var source = sources.removeValue(forKey: layer.name)
                ?? productWidth.map { files.rowBlocks(of: layer, productWidth: $0) }
                ?? files.rowBlocks(of: layer)
            if let blockRows, source.blockRows < blockRows {
                source = files.rowBlocks(of: layer, blockRows: blockRows)
            }
            defer { sources[layer.name] = source }
            return try body(&source)
        }
    }

    /// Rows `range` of the summed layer in the payload dtype, plus a zstd'd shuffled copy when asked.
    func encode(_ layer: GradientLayer, rows range: Range<Int>, as dtype: TensorDType, compress: Bool) throws -> EncodedShard {
        let count = range.count * layer.cols
        if dtype == .f32, !compress {
            if let shard = try storedF32Shard(layer, rows: range) { return shard }
            if let (buffer, checksum) = try readF32Payload(layer, region: LayerRegion(rows: range, cols: 0..<layer.cols)) {
                return EncodedShard(uncompressed: buffer, checksum: checksum)
            }
        }
        return try withSource(layer, blockRows: range.count) { source in
            try source.withSummedRows(range) { block in
                var buffer = ByteBufferAllocator().buffer(capacity: block.values.count * dtype.byteSize)
                buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: block.values.count * dtype.byteSize) { raw in
                    FloatCodec.encode(block.values, as: dtype, into: raw)
                    return block.values.count * dtype.byteSize
                }
                guard compress else {
                    return EncodedShard(uncompressed: buffer, compressed: nil, checksum: buffer.withUnsafeReadableBytes { ShardChecksum.hash($0) })
                }
                let shuffled = buffer.withUnsafeReadableBytes { ByteShuffle.shuffle($0, elementSize: dtype.byteSize) }
                let packed = try codec.compress(shuffled, level: 1)   // already under the lock
                return EncodedShard(uncompressed: buffer, compressed: ByteBuffer(bytes: packed), checksum: ShardChecksum.hash(packed))
            }
        }
    }

    /// Rectangle `region` of the summed layer (a band of rows of one of ``parts(of:)``) in the
    /// payload dtype, plus a zstd'd shuffled copy when asked. Full-width rectangles take
    /// ``encode(_:rows:as:compress:)`` (sendfile, the row-block source); narrower ones are read
    /// at their columns only.
    func encode(_ layer: GradientLayer, region: LayerRegion, as dtype: TensorDType, compress: Bool) throws -> EncodedShard {
        if region.cols == 0..<layer.cols { return try encode(layer, rows: region.rows, as: dtype, compress: compress) }
        if dtype == .f32, !compress, let (buffer, checksum) = try readF32Payload(layer, region: region) {
            return EncodedShard(uncompressed: buffer, checksum: checksum)
        }
        var values = [Float](repeating: 0, count: region.elementCount)
        try lock.withLock {
            try values.withUnsafeMutableBufferPointer { try files.readSummed(of: layer, region: region, into: $0[...]) }
        }
        var buffer = ByteBufferAllocator().buffer(capacity: values.count * dtype.byteSize)
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: values.count * dtype.byteSize) { raw in
            values.withUnsafeBufferPointer { FloatCodec.encode($0, as: dtype, into: raw) }
            return values.count * dtype.byteSize
        }
        guard compress else {
            return EncodedShard(uncompressed: buffer, compressed: nil, checksum: buffer.withUnsafeReadableBytes { ShardChecksum.hash($0) })
        }
        let shuffled = buffer.withUnsafeReadableBytes { ByteShuffle.shuffle($0, elementSize: dtype.byteSize) }
        let packed = try lock.withLock { try codec.compress(shuffled, level: 1) }
        return EncodedShard(uncompressed: buffer, compressed: ByteBuffer(bytes: packed), checksum: ShardChecksum.hash(packed))
    }

    /// A worker with one gradient file that stores the layer as F32 sends the rows as the file
    /// holds them: it maps them (no copy), hashes them and checks them for NaN/Inf in one pass
    /// ~256 KB at a time, and the socket gets them by `sendfile` from the page cache. That saves the read
    /// into a buffer and the copy into the socket, cutting the worker's CPU and memory per shard.
    /// Nil when the layer needs summing (several files) or converting, when
    /// its rows are not Float-aligned in the file, or when the file cannot be sent or mapped
    /// (see `sendHandle(for:)`).
    ///
    /// If the file changes between the hash and the send, the coordinator's check of the
    /// checksum refuses the shard, and of its values a NaN: nothing unchecked is summed.
    private func storedF32Shard(_ layer: GradientLayer, rows range: Range<Int>) throws -> EncodedShard? {
        #if _endian(little)
        guard storesRowsAsSent(layer), let file = files.soleWholeFile(of: layer) else { return nil }
        return try lock.withLock { () throws -> EncodedShard? in
            guard sendsFromFile, let handle = sendHandle(for: file) else { return nil }
            do {
                // Mapped a few MB at a time: the region sent is the whole shard, but only the
                // rows being hashed need to be mapped (and count in the worker's RSS).
                var checksum = ShardChecksum()
                var region: Range<Int>?
                let mappedRows = Swift.max(1, Self.mappedBytes / (4 * layer.cols))
                for start in stride(from: range.lowerBound, to: range.upperBound, by: mappedRows) {
                    let rows = start..<Swift.min(start + mappedRows, range.upperBound)
                    try file.withStoredRows(layer.name, rows: rows) { bytes, fileOffset in
                        region = (region?.lowerBound ?? fileOffset)..<(fileOffset + bytes.count)
                        try Self.hashAndCheck(bytes, rows: rows, into: &checksum, layer: layer, path: file.path)
                    }
                }
                guard let region else { return nil }
                return EncodedShard(file: FileRegion(fileHandle: handle, readerIndex: region.lowerBound, endIndex: region.upperBound), checksum: checksum.value)
            } catch let error as SafeTensorsError {
                // The file cannot be mapped (or the rows are not where the header says, which
                // the read into a buffer reports properly): read shards into buffers from now on.
                stopSendingFromFile(file, because: "\(error)")
                return nil
            }
        }
        #else
        return nil
        #endif
    }

    /// Whether ``encode(_:rows:as:compress:)`` sends `layer`'s rows from the file (sendfile)
    /// rather than from a buffer: one file storing it as F32 at a Float-aligned offset, sent as
    /// F32 uncompressed, from a file the kernel can `sendfile` from (probed now if not yet). Shards
    /// of such a layer may be large: they cost no memory (``WorkerOptions/fileShardBytes``).
    /// Mapping can still fail later; those shards are then read into buffers.
    func sendsRowsFromFile(of layer: GradientLayer, as dtype: TensorDType, compress: Bool) -> Bool {
        #if _endian(little)
        guard dtype == .f32, !compress, storesRowsAsSent(layer) else { return false }
        return lock.withLock { sendsFromFile && sendHandle(for: files.files[0]) != nil }
        #else
        return false
        #endif
    }

    /// One file, storing `layer` whole as F32 at a Float-aligned offset: its bytes are the
    /// payload, nothing to sum, place or convert, and mapped they are Floats (a page-aligned
    /// mapping keeps the offset's alignment).
    private func storesRowsAsSent(_ layer: GradientLayer) -> Bool {
        guard files.files.count == 1, layer.dtype == .f32,
              let file = files.soleWholeFile(of: layer), let offset = try? file.storedOffset(of: layer.name) else { return false }
        return offset % MemoryLayout<Float>.alignment == 0
    }

    /// The handle `sendfile` reads `file` through, made on first use; nil (and no more tries)
    /// when the kernel cannot `sendfile` from it, or no descriptor is left for it. Called under `lock`.
    private func sendHandle(for file: SafeTensorsFile) -> NIOFileHandle? {
        if let sendHandle { return sendHandle }
        let descriptor: Int32
        do {
            descriptor = try file.duplicateDescriptor()
        } catch {
            stopSendingFromFile(file, because: "\(error)")
            return nil
        }
        guard Self.canSendfile(from: descriptor) else {
            close(descriptor)
            stopSendingFromFile(file, because: "the kernel cannot sendfile from it")
            return nil
        }
        let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: descriptor)
        sendHandle = handle
        return handle
    }

    private func stopSendingFromFile(_ file: SafeTensorsFile, because reason: String) {
        sendsFromFile = false
        logger?.info("\(file.path): shards are read into buffers, not sent from the file (\(reason))")
    }

    /// Feeds mapped F32 rows `rows` (Float-aligned, see `storesRowsAsSent`) to `checksum`,
    /// checking them for NaN/Inf in the same pass, ~256 KB at a time. A NaN/Inf is an error
    /// naming the file, layer and row.
    private static func hashAndCheck(_ bytes: UnsafeRawBufferPointer, rows range: Range<Int>, into checksum: inout ShardChecksum, layer: GradientLayer, path: String) throws {
        guard let base = bytes.baseAddress else { return }
        precondition(Int(bitPattern: base) % MemoryLayout<Float>.alignment == 0, "mapped rows of '\(layer.name)' are not Float-aligned")
        let floats = base.assumingMemoryBound(to: Float.self)
        let pieceRows = Swift.max(1, hashedPieceBytes / (4 * layer.cols))
        for start in stride(from: range.lowerBound, to: range.upperBound, by: pieceRows) {
            let rows = start..<Swift.min(start + pieceRows, range.upperBound)
            let values = UnsafeBufferPointer(start: floats + (rows.lowerBound - range.lowerBound) * layer.cols, count: rows.count * layer.cols)
            guard checksum.updateCheckingFinite(float32: UnsafeRawBufferPointer(values)) else {
                let index = RowBlock(rowStart: rows.lowerBound, rowCount: rows.count, cols: layer.cols, values: values).firstNonFiniteIndex()
                precondition(index != nil, "the hash's finiteness check flagged rows \(rows) of '\(layer.name)', the scan finds nothing")
                throw GradientError.nonFinite(layer: layer.name, source: path, row: rows.lowerBound + index! / layer.cols)
            }
        }
    }

    /// Rows of a file-sent shard mapped at a time to be hashed (its region is sent whole).
    private static let mappedBytes = 4 << 20

    /// Whether the kernel can `sendfile` from `descriptor`: one byte into a pipe. Linux only
    /// (elsewhere `sendfile` has other semantics, and shards are read into buffers).
    static func canSendfile(from descriptor: Int32) -> Bool {
        #if os(Linux)
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { return false }
        defer {
            close(ends[0])
            close(ends[1])
        }
        var offset: off_t = 0
        return sendfile(ends[1], descriptor, &offset, 1) == 1
        #else
        return false
        #endif
    }

    /// F32 payloads (rows `region.rows`, columns `region.cols`) are read (and summed) straight into the frame's buffer: one copy fewer
    /// per shard than going through the block buffer. Nil if the buffer is not Float-aligned.
    ///
    /// Read, checked and hashed ~256 KB of rows at a time, so the check and the hash find the
    /// bytes in cache rather than reading a whole shard back from memory.
    private func readF32Payload(_ layer: GradientLayer, region: LayerRegion) throws -> (ByteBuffer, UInt64)? {
        let (range, width, count) = (region.rows, region.cols.count, region.elementCount)
        var buffer = ByteBufferAllocator().buffer(capacity: count * 4)
        let aligned = buffer.withUnsafeMutableWritableBytes { Int(bitPattern: $0.baseAddress) % MemoryLayout<Float>.alignment == 0 }
        guard aligned else { return nil }
        var checksum = ShardChecksum()
        let pieceRows = Swift.max(1, Self.hashedPieceBytes / (4 * width))
        _ = try lock.withLock {
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count * 4) { raw in
                try UnsafeMutableRawBufferPointer(rebasing: raw[0..<(count * 4)]).withMemoryRebound(to: Float.self) { floats in
                    for start in stride(from: range.lowerBound, to: range.upperBound, by: pieceRows) {
                        let rows = start..<Swift.min(start + pieceRows, range.upperBound)
                        let piece = floats[((rows.lowerBound - range.lowerBound) * width)..<((rows.upperBound - range.lowerBound) * width)]
                        if width == layer.cols {
                            try files.readSummedRows(of: layer, rows: rows, into: piece)
                        } else {
                            try files.readSummed(of: layer, region: LayerRegion(rows: rows, cols: region.cols), into: piece)
                        }
                        checksum.update(UnsafeRawBufferPointer(UnsafeMutableBufferPointer(rebasing: piece)))
                    }
                }
                return count * 4
            }
        }
        return (buffer, checksum.value)
    }

    /// Bytes of rows read and hashed at a time by ``readF32Payload(_:region:)``.
    private static let hashedPieceBytes = 256 << 10

    /// G_w · X or G_wᵀ · X for a power-iteration request on `layer`, computed from this
    /// worker's blocks only (``rangeProduct(with:layer:)``, ``coRangeProduct(with:layer:)``).
    /// The request carries only the rows of X the share multiplies (the rest count as zero:
    /// the blocks never read them), and the reply only the rows of the product the share makes
    /// nonzero (``productSpans(of:side:)``).
    func answer(_ request: PowerRequest, layer: GradientLayer) throws -> PowerReply {
        let x = Matrix(rows: Int(request.matrixRows), cols: Int(request.matrixCols), storage: request.fullValues)
        let product = switch request.side {
        case .range: try rangeProduct(with: x, layer: layer)
        case .corange: try coRangeProduct(with: x, layer: layer)
        }
        return PowerReply(layerIndex: request.layerIndex, round: request.round, side: request.side, rowsOf: product.storage,
                          matrixRows: product.rows, matrixCols: product.cols, spans: productSpans(of: layer, side: request.side))
    }

    /// Y = G_w · P for this worker's share G_w = Σ_b E_b(G_b) of `layer`:
    /// Y[r0:r1, :] += G_b · P[c0:c1, :], only over the rows and columns its blocks touch, so a
    /// worker holding 1/N of the layer does 1/N of the multiplications. `P` is in × k; the
    /// result is out × k and zero outside `coverage(of: layer).coveredRows`.
    func rangeProduct(with p: Matrix, layer: GradientLayer) throws -> Matrix {
        try withSource(layer, productWidth: p.cols) { try $0.blockProduct(with: p) }
    }

    /// Z = G_wᵀ · Q for this worker's share (Z[c0:c1, :] += G_bᵀ · Q[r0:r1, :]). `Q` is out × k;
    /// the result is in × k and zero outside `coverage(of: layer).coveredCols`.
    func coRangeProduct(with q: Matrix, layer: GradientLayer) throws -> Matrix {
        try withSource(layer, productWidth: q.cols) { try $0.blockTransposedProduct(with: q) }
    }
}
