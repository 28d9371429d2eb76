import Crypto
import Foundation

/// Proof that a worker knows the job's shared secret, bound to this connection:
///
///     proof = HMAC-SHA256(secret, "lora-ga/1" ‖ challenge nonce ‖ u16 len ‖ worker id ‖ u64 session nonce)
///
/// The coordinator draws a fresh 32-byte nonce per connection, so a recorded Hello is
/// worthless on any other connection (no replay), and the secret never crosses the wire.
public struct JobSecret: Sendable {
    let key: SymmetricKey

    /// At least 16 bytes of secret; surrounding whitespace (a trailing newline) is ignored.
    public init(bytes: some Collection<UInt8>) throws {
        let trimmed = Array(bytes).trimmingASCIIWhitespace()
        guard trimmed.count >= 16 else {
            throw SecretError("the shared secret is \(trimmed.count) bytes; use at least 16 (e.g. `openssl rand -hex 32 > secret`)")
        }
        key = SymmetricKey(data: trimmed)
    }

    /// Reads the secret from a file (never from the command line, so it stays out of `ps` and logs).
    public init(file path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SecretError("secret file \(path): cannot read it")
        }
        do {
            try self.init(bytes: data)
        } catch let error as SecretError {
            throw SecretError("secret file \(path): \(error.message)")
        }
    }

    public func proof(challenge: Bytes32, workerID: String, sessionNonce: UInt64) -> Bytes32 {
        let code = HMAC<SHA256>.authenticationCode(for: JobSecret.message(challenge: challenge, workerID: workerID, sessionNonce: sessionNonce), using: key)
        return Bytes32(Array(code))!
    }

    /// Constant-time check of a Hello's proof against this connection's challenge.
    public func verify(_ hello: Hello, challenge: Bytes32) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(
            hello.authProof.bytes,
            authenticating: JobSecret.message(challenge: challenge, workerID: hello.workerID, sessionNonce: hello.sessionNonce),
            using: key)
    }

    static func message(challenge: Bytes32, workerID: String, sessionNonce: UInt64) -> [UInt8] {
        var message = Array("lora-ga/1".utf8)
        message += challenge.bytes
        let id = Array(workerID.utf8)
        message += withUnsafeBytes(of: UInt16(id.count).littleEndian, Array.init)
        message += id
        message += withUnsafeBytes(of: sessionNonce.littleEndian, Array.init)
        return message
    }
}

public struct SecretError: Error, CustomStringConvertible {
    public let message: String
    init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension Array where Element == UInt8 {
    func trimmingASCIIWhitespace() -> [UInt8] {
        let isSpace: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x0A || $0 == 0x0D || $0 == 0x09 }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return [] }
        return Array(self[first...last])
    }
}
