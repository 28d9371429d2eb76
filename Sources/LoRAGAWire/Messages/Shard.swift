import LoRAGACore
import NIOCore

/// Type 6, worker → coordinator: a rectangle of one layer's gradient, rows
/// `[rowStart, rowStart + rowCount)` and columns `[colStart, colStart + cols)`, row-major,
/// `cols` wide. A worker holding a whole layer sends full rows (`colStart` 0, `cols` the
/// layer's width); one holding blocks sends only the rectangles it holds.
///
/// `uncompressedBytes` is always `rowCount × cols × dtype.byteSize`; without
/// compression `payload` holds exactly that many bytes. With compression the
/// receiver checks `rowCount` and `cols` against the job before it allocates
/// `uncompressedBytes` for decompression. `checksum` is XXH3-64 (``ShardChecksum``) of
/// the payload as sent (the compressed bytes when compressed): the receiver
/// checks it where the bytes arrive, while they are still in cache.
public struct Shard: WireMessageBody {
    public static let messageType = WireMessageType.shard

    /// Bytes before the payload.
    public static let headerBytes = 4 + 4 + 8 + 4 + 8 + 8 + 1 + 1 + 8 + 8

    public var layerIndex: UInt32
    /// The attempt of the `LayerBegin` this shard answers (older attempts are discarded).
    public var attempt: UInt32
    public var rowStart: UInt64
    public var rowCount: UInt32
    /// The first column of the rectangle (0 for full rows).
    public var colStart: UInt64
    /// The rectangle's width: columns per row of the payload.
    public var cols: UInt64
    public var dtype: TensorDType
    public var compression: WireCompression
    public var uncompressedBytes: UInt64
    /// ``ShardChecksum`` of `payload` as sent, computed by the sender.
    public var checksum: UInt64
    /// Decoded shards keep a slice of the received frame: no copy.
    public var payload: ByteBuffer
    /// Sender side only: the payload is these bytes of a file, exactly as stored there, and
    /// `FrameWriter` hands them to `sendfile` (no copy in the sender); `payload` is then empty.
    public var payloadFile: FileRegion?

    public init(
        layerIndex: UInt32,
        rowStart: UInt64,
        rowCount: UInt32,
        cols: UInt64,
        dtype: TensorDType,
        compression: WireCompression,
        uncompressedBytes: UInt64,
        payload: ByteBuffer,
        checksum: UInt64? = nil,
        attempt: UInt32 = 0,
        colStart: UInt64 = 0
    ) {
        self.layerIndex = layerIndex
        self.attempt = attempt
        self.rowStart = rowStart
        self.rowCount = rowCount
        self.colStart = colStart
        self.cols = cols
        self.dtype = dtype
        self.compression = compression
        self.uncompressedBytes = uncompressedBytes
        self.payload = payload
        self.checksum = checksum ?? payload.withUnsafeReadableBytes { ShardChecksum.hash($0) }
    }

    /// An uncompressed shard; `uncompressedBytes` is the payload's size, and `checksum`
    /// is computed from `payload` unless given.
    public init(layerIndex: UInt32, rowStart: UInt64, rowCount: UInt32, cols: UInt64, dtype: TensorDType, payload: ByteBuffer,
                checksum: UInt64? = nil, attempt: UInt32 = 0, colStart: UInt64 = 0) {
        self.init(
            layerIndex: layerIndex, rowStart: rowStart, rowCount: rowCount, cols: cols, dtype: dtype,
            compression: .uncompressed, uncompressedBytes: UInt64(payload.readableBytes), payload: payload, checksum: checksum, attempt: attempt,
            colStart: colStart
        )
    }

    /// An uncompressed shard sent straight from a file: `payloadFile` holds its rows as the
    /// file stores them (in the wire's dtype and byte order), and `checksum` is their hash.
    public init(layerIndex: UInt32, rowStart: UInt64, rowCount: UInt32, cols: UInt64, dtype: TensorDType, payloadFile: FileRegion,
                checksum: UInt64, attempt: UInt32 = 0, colStart: UInt64 = 0) {
        self.init(
            layerIndex: layerIndex, rowStart: rowStart, rowCount: rowCount, cols: cols, dtype: dtype, compression: .uncompressed,
            uncompressedBytes: UInt64(payloadFile.readableBytes), payload: ByteBuffer(), checksum: checksum, attempt: attempt, colStart: colStart)
        self.payloadFile = payloadFile
    }

    /// Payload bytes on the wire.
    public var payloadBytes: Int { payloadFile?.readableBytes ?? payload.readableBytes }

    /// Whether `payload` hashes to `checksum` (for shards decoded whole; the streaming
    /// decoder checks pieces as they arrive, see ``ShardPiece/checksumMatches``).
    public var payloadMatchesChecksum: Bool {
        payload.withUnsafeReadableBytes { ShardChecksum.hash($0) } == checksum
    }

    /// Rows one past the last row of this shard (validated not to overflow).
    public var rowEnd: UInt64 { rowStart + UInt64(rowCount) }

    /// Columns one past the last column of this shard (validated not to overflow).
    public var colEnd: UInt64 { colStart + cols }

    public func validate() throws(WireError) {
        try validateFields()
        switch compression {
        case .uncompressed:
            guard payloadFile == nil || payload.readableBytes == 0 else {
                throw .malformed(Self.messageType, "a payload in memory and one in a file")
            }
            guard payloadBytes == Int(uncompressedBytes) else {
                throw .malformed(Self.messageType, "payload is \(payloadBytes) bytes, expected \(uncompressedBytes) for \(rowCount)×\(cols) \(dtype)")
            }
        case .zstdShuffled:
            guard payloadFile == nil else { throw .malformed(Self.messageType, "a compressed payload in a file") }
            guard payload.readableBytes > 0 else { throw .malformed(Self.messageType, "empty compressed payload") }
        }
    }

    /// The checks that need no payload (a streamed shard's fields arrive before its rows).
    public func validateFields() throws(WireError) {
        func fail(_ reason: String) -> WireError { .malformed(Self.messageType, reason) }
        guard dtype.isPayloadType else { throw fail("dtype \(dtype) cannot carry gradients") }
        guard rowCount > 0, cols > 0 else { throw fail("empty shard \(rowCount)×\(cols)") }
        guard !rowStart.addingReportingOverflow(UInt64(rowCount)).overflow else {
            throw fail("rowStart \(rowStart) + rowCount \(rowCount) overflows")
        }
        guard !colStart.addingReportingOverflow(cols).overflow else {
            throw fail("colStart \(colStart) + cols \(cols) overflows")
        }
        guard let expected = payloadByteCount(rows: rowCount, cols: cols, dtype: dtype) else {
            throw fail("\(rowCount)×\(cols) \(dtype) overflows a byte count")
        }
        guard uncompressedBytes == UInt64(expected) else {
            throw fail("uncompressedBytes \(uncompressedBytes), expected \(expected) for \(rowCount)×\(cols) \(dtype)")
        }
    }

    public func encode(into buffer: inout ByteBuffer) {
        precondition(payloadFile == nil, "a shard sent from a file region is written by FrameWriter (sendfile); encode(into:) does not read files")
        encodeFields(into: &buffer)
        buffer.writeImmutableBuffer(payload)
    }

    public var trailingBulk: IOData? { payloadFile.map(IOData.fileRegion) ?? .byteBuffer(payload) }

    public func encodeFields(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(layerIndex)
        buffer.writeLittleEndian(attempt)
        buffer.writeLittleEndian(rowStart)
        buffer.writeLittleEndian(rowCount)
        buffer.writeLittleEndian(colStart)
        buffer.writeLittleEndian(cols)
        buffer.writeLittleEndian(dtype.wireCode)
        buffer.writeLittleEndian(compression.rawValue)
        buffer.writeLittleEndian(uncompressedBytes)
        buffer.writeLittleEndian(checksum)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        try self.init(fieldsFrom: &buffer)
        payload = buffer.readSlice(length: buffer.readableBytes)!
        try validate()
    }

    /// The fields only (`headerBytes` of them), consumed from `buffer`; `payload` is left
    /// empty and nothing is validated.
    public init(fieldsFrom buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let layerIndex = try reader.integer("layerIndex", as: UInt32.self)
        let attempt = try reader.integer("attempt", as: UInt32.self)
        let rowStart = try reader.integer("rowStart", as: UInt64.self)
        let rowCount = try reader.integer("rowCount", as: UInt32.self)
        let colStart = try reader.integer("colStart", as: UInt64.self)
        let cols = try reader.integer("cols", as: UInt64.self)
        let dtype = try reader.enumeration("dtype", as: TensorDType.self)
        let compression = try reader.enumeration("compression", as: WireCompression.self)
        let uncompressedBytes = try reader.integer("uncompressedBytes", as: UInt64.self)
        let checksum = try reader.integer("checksum", as: UInt64.self)
        buffer = reader.buffer
        self.init(
            layerIndex: layerIndex, rowStart: rowStart, rowCount: rowCount, cols: cols, dtype: dtype,
            compression: compression, uncompressedBytes: uncompressedBytes, payload: ByteBuffer(), checksum: checksum, attempt: attempt,
            colStart: colStart
        )
    }
}
