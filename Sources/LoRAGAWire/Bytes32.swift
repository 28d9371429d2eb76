/// Exactly 32 bytes: a challenge nonce or an authentication proof.
public struct Bytes32: Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    /// `nil` unless `bytes` holds exactly 32 bytes.
    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == 32 else { return nil }
        self.bytes = Array(bytes)
    }

    /// All zero: the proof sent when the job has no secret.
    public static let zero = Bytes32(repeatElement(0, count: 32))!

    public static func random(using generator: inout some RandomNumberGenerator) -> Bytes32 {
        var bytes = [UInt8]()
        bytes.reserveCapacity(32)
        for _ in 0..<4 {
            withUnsafeBytes(of: generator.next().littleEndian) { bytes.append(contentsOf: $0) }
        }
        return Bytes32(bytes)!
    }

    /// From the system's secure generator (getrandom on Linux).
    public static func random() -> Bytes32 {
        var generator = SystemRandomNumberGenerator()
        return random(using: &generator)
    }

    public var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

    public var description: String {
        bytes.map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }
}
