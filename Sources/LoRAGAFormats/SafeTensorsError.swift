import Foundation

/// Why a safetensors file could not be read or written.
///
/// The description always starts with the file's path, so a message from a
/// worker with many shards tells the operator which file to look at.
public struct SafeTensorsError: Error, Sendable, CustomStringConvertible, LocalizedError {
    /// The path as given to the reader or writer.
    public let path: String
    /// What is wrong, in one sentence without the path.
    public let problem: String

    public init(path: String, problem: String) {
        self.path = path
        self.problem = problem
    }

    public var description: String { "\(path): \(problem)" }
    public var errorDescription: String? { description }
}
