import NIOCore

/// Why a peer gave up (u16 on the wire; 0 is reserved).
public enum WireErrorCode: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case badVersion = 1
    case badAuth = 2
    case duplicateWorker = 3
    case shapeMismatch = 4
    case layerMismatch = 5
    case badData = 6
    case `internal` = 7
    case jobFailed = 8

    public var description: String {
        switch self {
        case .badVersion: "badVersion"
        case .badAuth: "badAuth"
        case .duplicateWorker: "duplicateWorker"
        case .shapeMismatch: "shapeMismatch"
        case .layerMismatch: "layerMismatch"
        case .badData: "badData"
        case .internal: "internal"
        case .jobFailed: "jobFailed"
        }
    }
}

/// Type 11, either way: a fatal problem, usually followed by a close.
public struct ErrorMessage: WireMessageBody {
    public static let messageType = WireMessageType.error

    public var code: WireErrorCode
    public var message: String

    /// `message` is cut to `WireProtocol.maxTextBytes` at a character boundary.
    public init(code: WireErrorCode, message: String) {
        self.code = code
        self.message = FieldRule.clampText(message)
    }

    public func validate() throws(WireError) {
        try FieldRule.name(message, "message", maxBytes: WireProtocol.maxTextBytes, allowEmpty: true, in: Self.messageType)
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(code.rawValue)
        buffer.writeWireString(message)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let code = try reader.enumeration("code", as: WireErrorCode.self)
        let message = try reader.string("message", maxBytes: WireProtocol.maxTextBytes)
        try reader.finish()
        buffer = reader.buffer
        self.init(code: code, message: message)
    }
}

/// Type 12, coordinator → worker: every layer is done; the adapter is written.
public struct JobDone: WireMessageBody {
    public static let messageType = WireMessageType.jobDone

    public var adapterPath: String
    public var layers: UInt32

    public init(adapterPath: String, layers: UInt32) {
        self.adapterPath = adapterPath
        self.layers = layers
    }

    public func validate() throws(WireError) {
        try FieldRule.name(adapterPath, "adapterPath", maxBytes: WireProtocol.maxTextBytes, allowEmpty: true, in: Self.messageType)
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeWireString(adapterPath)
        buffer.writeLittleEndian(layers)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let adapterPath = try reader.string("adapterPath", maxBytes: WireProtocol.maxTextBytes)
        let layers = try reader.integer("layers", as: UInt32.self)
        try reader.finish()
        buffer = reader.buffer
        self.init(adapterPath: adapterPath, layers: layers)
    }
}

/// Type 13, either way: a deliberate close is coming.
public struct Goodbye: WireMessageBody {
    public static let messageType = WireMessageType.goodbye

    public var reason: String

    /// `reason` is cut to `WireProtocol.maxTextBytes` at a character boundary.
    public init(reason: String) {
        self.reason = FieldRule.clampText(reason)
    }

    public func validate() throws(WireError) {
        try FieldRule.name(reason, "reason", maxBytes: WireProtocol.maxTextBytes, allowEmpty: true, in: Self.messageType)
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeWireString(reason)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let reason = try reader.string("reason", maxBytes: WireProtocol.maxTextBytes)
        try reader.finish()
        buffer = reader.buffer
        self.init(reason: reason)
    }
}
