import Foundation

/// Why a layer checkpoint could not be written or read; the description
/// starts with the file's path, then the problem found.
public struct CheckpointError: Error, Sendable, CustomStringConvertible, LocalizedError {
    public let path: String
    public let problem: String

    public init(path: String, problem: String) {
        self.path = path
        self.problem = problem
    }

    public var description: String { "\(path): \(problem)" }
    public var errorDescription: String? { description }
}
