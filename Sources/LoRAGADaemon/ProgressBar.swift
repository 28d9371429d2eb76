import Foundation

/// A one-line progress bar on stderr, drawn only when stderr is a terminal (so logs
/// redirected to a file stay plain lines): `[########------------] 5/12 layers  ETA 42s`.
public final class ProgressBar: @unchecked Sendable {
    private let lock = NSLock()
    private var progress: JobProgress
    private var drawn = false
    let width = 30

    /// Whether stderr is a terminal.
    public static var stderrIsTerminal: Bool { isatty(STDERR_FILENO) != 0 }

    /// A bar for `total` layers of which `done` are finished already; nil when stderr is not a terminal.
    public static func forTerminal(total: Int, done: Int = 0) -> ProgressBar? {
        stderrIsTerminal ? ProgressBar(total: total, done: done) : nil
    }

    public init(total: Int, done: Int = 0) {
        progress = JobProgress(total: total, done: done)
    }

    /// Sets the layers done and redraws.
    public func update(done: Int, total: Int? = nil) {
        lock.lock()
        defer { lock.unlock() }
        if let total { progress.total = total }
        while progress.done < done { progress.layerDone() }
        draw()
    }

    /// The bar's text (without the carriage return).
    public var line: String {
        let filled = Int((progress.fraction * Double(width)).rounded(.down))
        return "[" + String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled) + "] "
            + "\(progress.done)/\(progress.total) layers  \(progress.estimate())"
    }

    private func draw() {
        FileHandle.standardError.write(Data(("\r" + line + "\u{1B}[K").utf8))
        drawn = true
    }

    /// Erases the bar so a log line can take its place; the next update draws it again.
    public func clear() {
        lock.lock()
        defer { lock.unlock() }
        guard drawn else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
        drawn = false
    }

    /// Leaves the final bar on its own line.
    public func finish() {
        lock.lock()
        defer { lock.unlock() }
        draw()
        FileHandle.standardError.write(Data("\n".utf8))
        drawn = false
    }
}
