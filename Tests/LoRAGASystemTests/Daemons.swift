import Foundation
import Testing

/// The built executables run as real processes, their stderr kept in a file.
struct Daemon {
    let process: Process
    let stderrPath: String

    /// Starts `executable` (lora-ga, lora-ga-coord or lora-ga-worker) with `arguments`;
    /// `environment` replaces LORA_GA_* variables of this process.
    static func start(_ executable: String, _ arguments: [String], environment: [String: String] = [:], scratch: String) throws -> Daemon {
        let binary = FaultDrillTests.binaries.appendingPathComponent(executable).path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "build the executables first (swift build): \(binary) is missing")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        var inherited = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("LORA_GA_") }
        inherited.merge(environment) { $1 }
        process.environment = inherited
        let stderrPath = scratch + "/\(executable)-\(UUID().uuidString.prefix(6)).stderr"
        FileManager.default.createFile(atPath: stderrPath, contents: nil)
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        return Daemon(process: process, stderrPath: stderrPath)
    }

    /// Runs to the end and returns the exit status and stderr.
    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:], scratch: String,
                    timeout: Duration = .seconds(120)) throws -> (status: Int32, stderr: String) {
        let daemon = try start(executable, arguments, environment: environment, scratch: scratch)
        let status = daemon.wait(timeout: timeout)
        return (status, daemon.stderr)
    }

    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }

    /// Waits for the exit (killing the process after `timeout`) and returns its status.
    func wait(timeout: Duration = .seconds(120)) -> Int32 {
        let deadline = ContinuousClock.now + timeout
        while process.isRunning, ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.02) }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Waits until stderr matches `pattern` (a regular expression) and returns the first capture group.
    func waitForLog(_ pattern: String, timeout: Duration = .seconds(30)) throws -> String {
        let regex = try NSRegularExpression(pattern: pattern)
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let text = stderr
            if let match = regex.firstMatch(in: text, range: NSRange(text.startIndex..., in: text)) {
                return match.numberOfRanges > 1 ? String(text[Range(match.range(at: 1), in: text)!]) : String(text[Range(match.range, in: text)!])
            }
            guard process.isRunning else { break }
            Thread.sleep(forTimeInterval: 0.02)
        }
        Issue.record("no log line matching \(pattern) within \(timeout):\n\(stderr)")
        throw CancellationError()
    }

    /// Waits for the file a daemon writes its port to.
    static func port(from file: String, of daemon: Daemon, timeout: Duration = .seconds(30)) throws -> Int {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let text = try? String(contentsOfFile: file, encoding: .utf8), let port = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) { return port }
            guard daemon.process.isRunning else { break }
            Thread.sleep(forTimeInterval: 0.01)
        }
        Issue.record("no port in \(file):\n\(daemon.stderr)")
        throw CancellationError()
    }
}

/// Prometheus text: the value of the first sample named exactly `name` (no labels).
func metricValue(_ text: String, _ name: String) -> Double? {
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        let parts = line.split(separator: " ")
        if parts.count >= 2, parts[0] == name { return Double(parts[1]) }
    }
    return nil
}

/// GET http://127.0.0.1:port/path with curl (a real HTTP client, as a scraper would be).
func httpGet(port: Int, path: String = "/metrics") throws -> (status: Int, body: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
    process.arguments = ["-s", "-w", "\n%{http_code}", "--max-time", "10", "http://127.0.0.1:\(port)\(path)"]
    let output = Pipe()
    process.standardOutput = output
    try process.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
    let status = Int(lines.popLast() ?? "") ?? 0
    return (status, lines.joined(separator: "\n"))
}
