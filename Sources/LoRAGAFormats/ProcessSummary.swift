import Foundation
import LoRAGACore

/// One process's figures at the end of a job, as the daemons write them for `lora-ga local`.
public struct ProcessSummary: Codable, Sendable {
    public var role: String
    /// Bytes received (coordinator) or sent (worker) as payload.
    public var bytes: Int
    public var seconds: Double
    public var peakResidentBytes: Int
    public var cpuSeconds: Double
    /// A worker's gradient file bytes, to compare traffic against.
    public var inputBytes: Int?

    public init(role: String, bytes: Int, seconds: Double, inputBytes: Int? = nil) {
        self.role = role
        self.bytes = bytes
        self.seconds = seconds
        self.peakResidentBytes = ResourceUsage.peakResidentBytes
        self.cpuSeconds = ResourceUsage.cpuSeconds
        self.inputBytes = inputBytes
    }

    public func write(to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(self).write(to: URL(fileURLWithPath: path), options: .atomic)
    }

    public static func read(from path: String) throws -> ProcessSummary {
        try JSONDecoder().decode(ProcessSummary.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
    }
}
