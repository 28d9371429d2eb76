import LoRAGACore
import LoRAGAFormats
import LoRAGAWire

/// An error that knows which kind of failure it is (and so the process's exit status).
/// Errors are classified where they arise, never by reading their messages.
public protocol ClassifiedError: Error {
    var kind: JobError.Kind { get }
}

extension JobError: ClassifiedError {}

/// The documented exit statuses of lora-ga, lora-ga-coord and lora-ga-worker.
public enum ExitStatus {
    /// The kind of failure `error` is: its own kind when it carries one, else by its type.
    public static func kind(of error: Error) -> JobError.Kind {
        switch error {
        case let classified as ClassifiedError: classified.kind
        // Unreadable or malformed input files and non-finite gradients.
        case is SafeTensorsError, is GradientError, is GradientSetError, is CheckpointError: .badInput
        // Another process holds the output directory: use another --out, or wait for it.
        case is OutputLockError: .usage
        // An unusable secret file is a configuration problem.
        case is SecretError: .usage
        case is CancellationError: .interrupted
        default: .other
        }
    }

    /// The exit status of a process that failed with `error`.
    public static func code(of error: Error) -> Int32 { kind(of: error).exitCode }

    /// The table every executable's --help ends with.
    public static let helpText = """
        EXIT STATUS
          0   done
          2   usage or configuration error (bad flag, unknown config key or LORA_GA_* variable, bad value)
          3   bad input data (NaN/Inf, conflicting shapes, unreadable or malformed files)
          4   authentication refused (wrong or missing shared secret)
          75  interrupted but resumable (SIGTERM/SIGINT; a worker's coordinator gone past --connect-timeout;
              a worker gone past the coordinator's --rejoin-timeout)
          1   anything else
        """
}
