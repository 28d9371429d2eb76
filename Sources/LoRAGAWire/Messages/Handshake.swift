import NIOCore

/// Type 1, worker → coordinator: who is connecting, with which protocol version.
public struct Hello: WireMessageBody {
    public static let messageType = WireMessageType.hello

    /// Always the first field, in every version, so a mismatch can be answered.
    public var protocolVersion: UInt16
    public var workerID: String
    /// Random per worker process, so a reconnect is recognisable.
    public var sessionNonce: UInt64
    /// All zero when the job has no secret.
    public var authProof: Bytes32

    public init(
        protocolVersion: UInt16 = WireProtocol.version,
        workerID: String,
        sessionNonce: UInt64,
        authProof: Bytes32 = .zero
    ) {
        self.protocolVersion = protocolVersion
        self.workerID = workerID
        self.sessionNonce = sessionNonce
        self.authProof = authProof
    }

    public func validate() throws(WireError) {
        try FieldRule.name(workerID, "workerID", maxBytes: WireProtocol.maxIDBytes, in: Self.messageType)
    }

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeLittleEndian(protocolVersion)
        buffer.writeWireString(workerID)
        buffer.writeLittleEndian(sessionNonce)
        buffer.writeBytes(authProof.bytes)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let protocolVersion = try reader.integer("protocolVersion", as: UInt16.self)
        let workerID = try reader.string("workerID", maxBytes: WireProtocol.maxIDBytes)
        let sessionNonce = try reader.integer("sessionNonce", as: UInt64.self)
        let authProof = try reader.bytes32("authProof")
        try reader.finish()
        buffer = reader.buffer
        self.init(protocolVersion: protocolVersion, workerID: workerID, sessionNonce: sessionNonce, authProof: authProof)
        try validate()
    }
}

/// Type 2, coordinator → worker, first on every connection: a fresh random nonce that the
/// worker's `Hello.authProof` answers (``JobSecret``), so a recorded Hello is useless elsewhere.
public struct Challenge: WireMessageBody {
    public static let messageType = WireMessageType.challenge

    public var nonce: Bytes32

    public init(nonce: Bytes32) {
        self.nonce = nonce
    }

    public func validate() throws(WireError) {}

    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeBytes(nonce.bytes)
    }

    public init(from buffer: inout ByteBuffer) throws(WireError) {
        var reader = PayloadReader(Self.messageType, buffer)
        let nonce = try reader.bytes32("nonce")
        try reader.finish()
        buffer = reader.buffer
        self.init(nonce: nonce)
    }
}
