/// A job-level failure with a message meant for the person running the job.
public struct JobError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
