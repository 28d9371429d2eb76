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
/// `payload` is `matrixRows × matrixCols`, row-major F32 little-endian.
public protocol PowerMatrixMessage: WireMessageBody {
    var layerIndex: UInt32 { get }
    var round: UInt32 { get }
    var side: WirePowerSide { get }
    var matrixRows: UInt32 { get }
    var matrixCols: UInt32 { get }
    var payload: ByteBuffer { get }
    init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, payload: ByteBuffer)
}

extension PowerMatrixMessage {
    /// Bytes before the payload.
    public static var headerBytes: Int { PowerMatrixFrame.headerBytes }

    /// Encodes `values` (row-major) as the payload.
    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, values: [Float]) {
        self.init(
            layerIndex: layerIndex, round: round, side: side, matrixRows: matrixRows, matrixCols: matrixCols,
            payload: ByteBuffer(float32LittleEndian: values)
        )
    }

    /// The payload as floats, row-major.
    public var values: [Float] { payload.getFloat32LittleEndian(at: payload.readerIndex, count: payload.readableFloat32Count)! }

    var frame: PowerMatrixFrame {
        PowerMatrixFrame(layerIndex: layerIndex, round: round, side: side, matrixRows: matrixRows, matrixCols: matrixCols, payload: payload)
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
        self.init(layerIndex: f.layerIndex, round: f.round, side: f.side, matrixRows: f.matrixRows, matrixCols: f.matrixCols, payload: f.payload)
    }
}

/// Type 9, coordinator → worker: multiply your gradient of `layerIndex` by X (the payload).
public struct PowerRequest: PowerMatrixMessage {
    public static let messageType = WireMessageType.powerRequest

    public var layerIndex: UInt32
    public var round: UInt32
    public var side: WirePowerSide
    public var matrixRows: UInt32
    public var matrixCols: UInt32
    public var payload: ByteBuffer

    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, payload: ByteBuffer) {
        (self.layerIndex, self.round, self.side) = (layerIndex, round, side)
        (self.matrixRows, self.matrixCols, self.payload) = (matrixRows, matrixCols, payload)
    }
}

/// Type 10, worker → coordinator: G·X or Gᵀ·X for the request with the same layer, round and side.
public struct PowerReply: PowerMatrixMessage {
    public static let messageType = WireMessageType.powerReply

    public var layerIndex: UInt32
    public var round: UInt32
    public var side: WirePowerSide
    public var matrixRows: UInt32
    public var matrixCols: UInt32
    public var payload: ByteBuffer

    public init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, payload: ByteBuffer) {
        (self.layerIndex, self.round, self.side) = (layerIndex, round, side)
        (self.matrixRows, self.matrixCols, self.payload) = (matrixRows, matrixCols, payload)
    }
}

/// The layout `PowerRequest` and `PowerReply` share.
struct PowerMatrixFrame {
    static let headerBytes = 4 + 4 + 1 + 4 + 4

    var layerIndex: UInt32
    var round: UInt32
    var side: WirePowerSide
    var matrixRows: UInt32
    var matrixCols: UInt32
    var payload: ByteBuffer

    init(layerIndex: UInt32, round: UInt32, side: WirePowerSide, matrixRows: UInt32, matrixCols: UInt32, payload: ByteBuffer) {
        self.layerIndex = layerIndex
        self.round = round
        self.side = side
        self.matrixRows = matrixRows
        self.matrixCols = matrixCols
        self.payload = payload
    }

    func validate(_ type: WireMessageType) throws(WireError) {
        guard matrixRows > 0, matrixCols > 0 else {
            throw .malformed(type, "empty matrix \(matrixRows)×\(matrixCols)")
        }
        // u32 × u32 × 4 < 2^66 can overflow UInt64; payloadByteCount reports that as nil.
        guard let expected = payloadByteCount(rows: matrixRows, cols: matrixCols, dtype: .f32),
            payload.readableBytes == expected
        else {
            throw .malformed(type, "payload is \(payload.readableBytes) bytes, expected \(matrixRows)×\(matrixCols)×4")
        }
    }

    func encodeFields(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(layerIndex)
        buffer.writeLittleEndian(round)
        buffer.writeLittleEndian(side.rawValue)
        buffer.writeLittleEndian(matrixRows)
        buffer.writeLittleEndian(matrixCols)
    }

    init(from buffer: inout ByteBuffer, _ type: WireMessageType) throws(WireError) {
        var reader = PayloadReader(type, buffer)
        let layerIndex = try reader.integer("layerIndex", as: UInt32.self)
        let round = try reader.integer("round", as: UInt32.self)
        let side = try reader.enumeration("side", as: WirePowerSide.self)
        let matrixRows = try reader.integer("matrixRows", as: UInt32.self)
        let matrixCols = try reader.integer("matrixCols", as: UInt32.self)
        let payload = reader.rest()
        buffer = reader.buffer
        self.init(layerIndex: layerIndex, round: round, side: side, matrixRows: matrixRows, matrixCols: matrixCols, payload: payload)
        try validate(type)
    }
}
