import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// An exclusive lock on a job's output directory, held for as long as the value lives.
///
/// Two processes writing one `--out` would resume, overwrite or wipe each other's layers and
/// still both exit 0 (a resubmitted cluster job whose first run is alive does exactly that).
/// The lock is `flock` on `OUT/.lora-ga.lock`: the kernel releases it when its holder dies,
/// so a lock left by a killed process is taken over safely, with no stale-pid guessing. The
/// file's text names the holder (pid, host, start time) for the refusal message.
public final class OutputLock: @unchecked Sendable {
    public static let fileName = ".lora-ga.lock"
    public let path: String
    private let descriptor: Int32

    /// Takes the lock or throws ``OutputLockError`` naming the process that holds it.
    /// - Parameter purpose: what this process does with the directory (shown to a second one).
    public init(directory: String, purpose: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        path = (directory as NSString).appendingPathComponent(OutputLock.fileName)
        descriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else {
            throw OutputLockError(directory: directory, holder: nil, reason: "cannot open \(path): \(String(cString: strerror(errno)))")
        }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            let reason = errno == EWOULDBLOCK ? nil : String(cString: strerror(errno))
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            close(descriptor)
            throw OutputLockError(directory: directory, holder: holder, reason: reason)
        }
        let stamp = ISO8601DateFormatter().string(from: Date())
        let text = "pid \(getpid()) on \(ProcessInfo.processInfo.hostName) since \(stamp) (\(purpose))\n"
        _ = ftruncate(descriptor, 0)
        _ = text.withCString { pwrite(descriptor, $0, strlen($0), 0) }
    }

    deinit {
        _ = ftruncate(descriptor, 0)
        flock(descriptor, LOCK_UN)
        close(descriptor)
    }
}

public struct OutputLockError: Error, CustomStringConvertible {
    public let directory: String
    /// Who holds the lock, as its holder wrote it, when known.
    public let holder: String?
    /// A system error other than "held by someone else".
    public let reason: String?
    public var description: String {
        if let reason { return "\(directory): cannot lock the output directory (\(reason))" }
        return "\(directory) is in use by another lora-ga process (\(holder.flatMap { $0.isEmpty ? nil : $0 } ?? "holder unknown")); wait for it to end, stop it, or use another --out"
    }
}
