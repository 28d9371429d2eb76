import NIOCore

/// Which product a power round asks for (u8).
public enum WirePowerSide: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// X is cols × k; reply with G·X (rows × k).
    case range = 0
    /// X is rows × k; reply with Gᵀ·X (cols × k).
    case corange = 1

    public var description: String {
        switch self {
        case .range: "range"
        case .corange: "corange"
        }
    }
}

/// A power round's matrix message: `PowerRequest` and `PowerReply` share fields, layout and
/// checks, and differ only in their type byte and direction.
///
/// The matrix is `matrixRows × matrixCols`; the message carries only its rows in `spans`
/// (sorted, disjoint, non-empty ranges within `matrixRows`), and `payload` holds those rows in
/// order, row-major F32 little-endian. The rows outside `spans` are zero (a reply) or not needed
/// by the receiver (a request): a worker holding part of a layer gets and sends only its part.
public protocol PowerMatrixMessage: WireMessageBody {
    var layerIndex: UInt32 { get }
    var round: UInt32 { get }
    var side: WirePowerSide { get }
    var matrixRows: UInt32 { get }
    var matrixCols: UInt32 { get }
    var spans: [Range<Int>] { get }
    var payload: ByteBuffer { get }
    init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, spans: [Range<Int>], payload: ByteBuffer)
}

extension PowerMatrixMessage {
    /// Bytes before the spans and the payload.
    public static var headerBytes: Int { PowerMatrixFrame.headerBytes }

    /// Most row ranges one message may carry.
    public static var maxSpans: Int { PowerMatrixFrame.maxSpans }

    /// The whole matrix: one span of every row.
    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, payload: ByteBuffer) {
        self.init(layerIndex: layerIndex, round: round, side: side, matrixRows: matrixRows, matrixCols: matrixCols,
                  spans: [0..<Int(matrixRows)], payload: payload)
    }

    /// Encodes `values` (row-major, the rows of `spans` in order; all rows by default) as the payload.
    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, spans: [Range<Int>]? = nil, values: [Float]) {
        self.init(
            layerIndex: layerIndex, round: round, side: side, matrixRows: matrixRows, matrixCols: matrixCols,
            spans: spans ?? [0..<Int(matrixRows)], payload: ByteBuffer(float32LittleEndian: values)
        )
    }

    /// The rows of the matrix in `spans` of `full` (matrixRows × matrixCols, row-major).
    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, rowsOf full: [Float], matrixRows: Int, matrixCols: Int, spans: [Range<Int>]) {
        var buffer = ByteBufferAllocator().buffer(capacity: spans.reduce(0) { $0 + $1.count } * matrixCols * 4)
        for span in spans {
            full.withUnsafeBufferPointer { values in
                _ = buffer.writeFloat32LittleEndian(UnsafeBufferPointer(rebasing: values[(span.lowerBound * matrixCols)..<(span.upperBound * matrixCols)]))
            }
        }
        self.init(layerIndex: layerIndex, round: round, side: side, matrixRows: UInt32(matrixRows), matrixCols: UInt32(matrixCols), spans: spans, payload: buffer)
    }

    /// The payload as floats, row-major: the rows of `spans`, in order.
    public var values: [Float] { payload.getFloat32LittleEndian(at: payload.readerIndex, count: payload.readableFloat32Count)! }

    /// The whole matrix, `matrixRows × matrixCols` row-major, zero outside `spans`.
    public var fullValues: [Float] {
        let cols = Int(matrixCols)
        if spans == [0..<Int(matrixRows)] { return values }
        var result = [Float](repeating: 0, count: Int(matrixRows) * cols)
        var offset = payload.readerIndex
        for span in spans {
            let count = span.count * cols
            let part = payload.getFloat32LittleEndian(at: offset, count: count)!
            result.replaceSubrange((span.lowerBound * cols)..<(span.upperBound * cols), with: part)
            offset += 4 * count
        }
        return result
    }

    /// This message carrying only the rows of `spans` (a whole message, cut for a receiver that
    /// needs only those); itself when `spans` is every row.
    public func restricted(to spans: [Range<Int>]) -> Self {
        guard spans != self.spans else { return self }
        return Self(layerIndex: layerIndex, round: round, side: side, rowsOf: fullValues,
                    matrixRows: Int(matrixRows), matrixCols: Int(matrixCols), spans: spans)
    }

    /// Rows carried: the sum of the spans' lengths.
    public var carriedRows: Int { spans.reduce(0) { $0 + $1.count } }

    var frame: PowerMatrixFrame {
        PowerMatrixFrame(layerIndex: layerIndex, round: round, side: side, matrixRows: matrixRows, matrixCols: matrixCols, spans: spans, payload: payload)
    }

    public func validate() throws(WireError) { try frame.validate(Self.messageType) }

    public func encode(into buffer: inout ByteBuffer) {
        frame.encodeFields(into: &buffer)
        buffer.writeImmutableBuffer(payload)
    }

    public var trailingBulk: IOData? { .byteBuffer(payload) }

    public func encodeFields(into buffer: inout ByteBuffer) { frame.encodeFields(into: &buffer) }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        let f = try PowerMatrixFrame(from: &buffer, Self.messageType)
        self.init(layerIndex: f.layerIndex, round: f.round, side: f.side, matrixRows: f.matrixRows, matrixCols: f.matrixCols, spans: f.spans, payload: f.payload)
    }
}

/// Type 9, coordinator → worker: multiply your gradient of `layerIndex` by X (the payload);
/// `spans` are the rows of X the worker's share needs (the columns it holds for the range
/// side, the rows it holds for the co-range side).
public struct PowerRequest: PowerMatrixMessage {
    public static let messageType = WireMessageType.powerRequest

    public var layerIndex: UInt32
    public var round: UInt32
    public var side: WirePowerSide
    public var matrixRows: UInt32
    public var matrixCols: UInt32
    public var spans: [Range<Int>]
    public var payload: ByteBuffer

    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, spans: [Range<Int>], payload: ByteBuffer) {
        (self.layerIndex, self.round, self.side) = (layerIndex, round, side)
        (self.matrixRows, self.matrixCols, self.spans, self.payload) = (matrixRows, matrixCols, spans, payload)
    }
}

/// Type 10, worker → coordinator: G·X or Gᵀ·X for the request with the same layer, round and
/// side; `spans` are the rows of the product its share can make nonzero (the rows it holds for
/// the range side, the columns it holds for the co-range side).
public struct PowerReply: PowerMatrixMessage {
    public static let messageType = WireMessageType.powerReply

    public var layerIndex: UInt32
    public var round: UInt32
    public var side: WirePowerSide
    public var matrixRows: UInt32
    public var matrixCols: UInt32
    public var spans: [Range<Int>]
    public var payload: ByteBuffer

    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, spans: [Range<Int>], payload: ByteBuffer) {
        (self.layerIndex, self.round, self.side) = (layerIndex, round, side)
        (self.matrixRows, self.matrixCols, self.spans, self.payload) = (matrixRows, matrixCols, spans, payload)
    }
}

/// The layout `PowerRequest` and `PowerReply` share.
struct PowerMatrixFrame {
    /// The fixed fields: layerIndex, round, side, matrixRows, matrixCols, span count.
    static let headerBytes = 4 + 4 + 1 + 4 + 4 + 4
    /// A worker's share is a union of its blocks' rows or columns: a few ranges, rarely more.
    static let maxSpans = 1 << 16

    var layerIndex: UInt32
    var round: UInt32
    var side: WirePowerSide
    var matrixRows: UInt32
    var matrixCols: UInt32
    var spans: [Range<Int>]
    var payload: ByteBuffer

    init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, spans: [Range<Int>], payload: ByteBuffer) {
        self.layerIndex = layerIndex
        self.round = round
        self.side = side
        self.matrixRows = matrixRows
        self.matrixCols = matrixCols
        self.spans = spans
        self.payload = payload
    }

    func validate(_ type: WireMessageType) throws(WireError) {
        guard matrixRows > 0, matrixCols > 0 else {
            throw .malformed(type, "empty matrix \(matrixRows)×\(matrixCols)")
        }
        guard !spans.isEmpty, spans.count <= Self.maxSpans else {
            throw .malformed(type, "\(spans.count) row ranges, need 1 to \(Self.maxSpans)")
        }
        var next = 0
        for span in spans {
            guard !span.isEmpty, span.lowerBound >= next, span.upperBound <= Int(matrixRows) else {
                throw .malformed(type, "row range \(span.lowerBound)..<\(span.upperBound) is empty, out of order or outside \(matrixRows) rows")
            }
            next = span.upperBound
        }
        let rows = spans.reduce(0) { $0 + $1.count }
        // u32 × u32 × 4 < 2^66 can overflow UInt64; payloadByteCount reports that as nil.
        guard let expected = payloadByteCount(rows: rows, cols: matrixCols, dtype: .f32),
            payload.readableBytes == expected
        else {
            throw .malformed(type, "payload is \(payload.readableBytes) bytes, expected \(rows)×\(matrixCols)×4")
        }
    }

    func encodeFields(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(layerIndex)
        buffer.writeLittleEndian(round)
        buffer.writeLittleEndian(side.rawValue)
        buffer.writeLittleEndian(matrixRows)
        buffer.writeLittleEndian(matrixCols)
        buffer.writeLittleEndian(UInt32(spans.count))
        for span in spans {
            buffer.writeLittleEndian(UInt32(span.lowerBound))
            buffer.writeLittleEndian(UInt32(span.upperBound))
        }
    }

    init(from buffer: inout ByteBuffer, _ type: WireMessageType) throws(WireError) {
        var reader = PayloadReader(type, buffer)
        let layerIndex = try reader.integer("layerIndex", as: UInt32.self)
        let round = try reader.integer("round", as: UInt32.self)
        let side = try reader.enumeration("side", as: WirePowerSide.self)
        let matrixRows = try reader.integer("matrixRows", as: UInt32.self)
        let matrixCols = try reader.integer("matrixCols", as: UInt32.self)
        let spanCount = try reader.count("row range count", minElementBytes: 8)
        guard spanCount <= Self.maxSpans else { throw .malformed(type, "\(spanCount) row ranges, at most \(Self.maxSpans)") }
        var spans: [Range<Int>] = []
        spans.reserveCapacity(spanCount)
        for _ in 0..<spanCount {
            let start = try reader.integer("row range start", as: UInt32.self)
            let end = try reader.integer("row range end", as: UInt32.self)
            guard start <= end else { throw .malformed(type, "row range \(start)..<\(end) is reversed") }
            spans.append(Int(start)..<Int(end))
        }
        let payload = reader.rest()
        buffer = reader.buffer
        self.init(layerIndex: layerIndex, round: round, side: side, matrixRows: matrixRows, matrixCols: matrixCols, spans: spans, payload: payload)
        try validate(type)
    }
}
