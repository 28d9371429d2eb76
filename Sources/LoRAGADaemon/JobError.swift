/// A job-level failure with a message meant for the person running the job, and the kind of
/// failure, which decides the process's exit status (schedulers tell "fix the input" from
/// "retry" from "preempted, resume" by it).
public struct JobError: Error, CustomStringConvertible, Equatable {
    public enum Kind: Sendable, Equatable {
        /// A usage or configuration error (exit 2).
        case usage
        /// Bad input data: NaN/Inf, conflicting shapes, unreadable or malformed files (exit 3).
        case badInput
        /// Authentication refused (exit 4).
        case authentication
        /// Interrupted but resumable: a termination signal, a coordinator gone (exit 75).
        case interrupted
        /// Anything else (exit 1).
        case other

        /// The documented exit status of a process that failed this way.
        public var exitCode: Int32 {
            switch self {
            case .usage: 2
            case .badInput: 3
            case .authentication: 4
            case .interrupted: 75
            case .other: 1
            }
        }
    }

    public let kind: Kind
    public let message: String
    public init(_ message: String) { self.init(.other, message) }
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { message }
}
