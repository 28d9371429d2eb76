import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGADaemon

struct LocalCommand: ParsableCommand, LoggingCommand {
    static let configuration = CommandConfiguration(
        commandName: "local",
        abstract: "Run the distributed job on this machine: one lora-ga-coord and N lora-ga-worker processes over loopback TCP.",
        discussion: """
            The gradient files under PATH… are dealt out round-robin to the workers (give N \
            directories for N workers to keep each worker's files together). The coordinator \
            writes the adapter and checkpoints to OUT; at the end a table shows every process's \
            peak memory and traffic.

            Example: lora-ga local --workers 2 --rank 8 --out adapter/ grads/worker0 grads/worker1
            """)

    @OptionGroup var lora: LoRAOptions

    @Option(help: "Number of worker processes.")
    var workers: Int = 2

    @Option(name: .shortAndLong, help: "Output directory.")
    var out: String

    @Option(help: "dtype shards travel in: f32, bf16 or f16.")
    var payloadDtype: TensorDType = .f32

    @Flag(help: "Discard an existing job in OUT instead of resuming it.")
    var restart = false

    @Flag(help: "Count entries of a layer that no gradient file covers (blocks leaving a hole) as zeros instead of refusing the layer.")
    var allowUncovered = false

    @Argument(help: "Gradient files or directories.")
    var paths: [String]

    func validate() throws {
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
    }

    @OptionGroup var logging: LogOptions

    func run() throws {
        let directory = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        let coordinatorPath = directory.appendingPathComponent("lora-ga-coord").path
        let workerPath = directory.appendingPathComponent("lora-ga-worker").path
        for path in [coordinatorPath, workerPath] where !FileManager.default.isExecutableFile(atPath: path) {
            throw ValidationError("\(path) not found: build every product (swift build -c release) so the daemons sit next to lora-ga")
        }
        let files = try GradientFileSet.expand(paths)
        // Each worker holds its share and cannot see the others' blocks: check the whole set's
        // shapes, blocks and coverage here, before any process starts (headers only).
        _ = try GradientFileSet(paths: paths, uncovered: allowUncovered ? .zero : .refused)
        // On a terminal the daemons only warn, and this draws their progress from the job's manifest.
        let progressBar = logging.logFormat == "text" ? ProgressBar.forTerminal(total: 0) : nil
        guard files.count >= workers else {
            throw ValidationError("\(workers) workers need at least \(workers) gradient files; found \(files.count) under \(paths.joined(separator: " "))")
        }
        // Whole directories go to one worker each when there are exactly N of them.
        let shares: [[String]] = paths.count == workers
            ? paths.map { [$0] }
            : (0..<workers).map { worker in stride(from: worker, to: files.count, by: workers).map { files[$0] } }

        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("lora-ga-local-\(ProcessInfo.processInfo.processIdentifier)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let portFile = scratch.appendingPathComponent("port").path
        // A fresh secret per run: the local job authenticates its workers like a cluster job does.
        let secretFile = scratch.appendingPathComponent("secret").path
        let secret = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        guard FileManager.default.createFile(atPath: secretFile, contents: Data(secret.utf8), attributes: [.posixPermissions: 0o600]) else {
            throw ValidationError("cannot write \(secretFile)")
        }
        let metadataFiles = lora.convention == .peft && lora.microBatches == nil ? try GradientFileSet(paths: paths).files : []
        let settings = lora.settings(microBatches: try lora.resolvedMicroBatches(files: metadataFiles))
        var coordinatorArguments = [
            "--listen", "127.0.0.1:0", "--port-file", portFile, "--workers", "\(workers)", "--out", out,
            "--rank", "\(settings.lora.rank)", "--alpha", "\(settings.lora.alpha)", "--direction", settings.lora.direction.rawValue,
            "--scale", settings.lora.scale.name, "--mode", settings.mode.rawValue, "--oversampling", "\(settings.oversampling)",
            "--passes", "\(settings.passes)", "--sketch-width", "\(settings.sketchWidth)", "--seed", "\(settings.seed)",
            "--payload-dtype", payloadDtype.argumentName, "--summary-file", scratch.appendingPathComponent("coordinator.json").path,
            "--secret-file", secretFile,
        ] + childLogArguments(quiet: progressBar != nil)
        coordinatorArguments += [
            "--gamma", "\(settings.lora.gamma)", "--method", settings.lora.method.rawValue,
            "--convention", settings.lora.convention.rawValue, "--micro-batches", "\(settings.lora.microBatches)",
        ]
        if settings.lora.fanInFanOut { coordinatorArguments.append("--fan-in-fan-out") }
        if settings.lora.useRSLoRA { coordinatorArguments.append("--rslora") }
        if restart { coordinatorArguments.append("--restart") }

        log("lora-ga local: 1 coordinator + \(workers) workers on loopback, \(files.count) gradient files, mode \(settings.mode.rawValue), rank \(settings.lora.rank) → \(out)")
        let coordinator = try launch(coordinatorPath, coordinatorArguments)
        let deadline = Date().addingTimeInterval(30)
        var port: String?
        while port == nil {
            if let text = try? String(contentsOfFile: portFile, encoding: .utf8), !text.isEmpty { port = text.trimmingCharacters(in: .whitespacesAndNewlines) }
            guard coordinator.isRunning else { throw ExitCode(coordinator.terminationStatus == 0 ? 1 : coordinator.terminationStatus) }
            guard Date() < deadline else {
                coordinator.terminate()
                throw ValidationError("the coordinator did not start listening within 30 s")
            }
            Thread.sleep(forTimeInterval: 0.005)   // the port file is written atomically
        }
        let workerProcesses = try shares.enumerated().map { index, share in
            try launch(workerPath, ["--connect", "127.0.0.1:\(port!)", "--id", "worker\(index)", "--secret-file", secretFile,
                                    "--summary-file", scratch.appendingPathComponent("worker\(index).json").path] + childLogArguments(quiet: progressBar != nil)
                + share.flatMap { ["--grads", $0] })
        }
        if let progressBar {
            CLILog.beforeWrite = { progressBar.clear() }
            while coordinator.isRunning {
                if let manifest = CheckpointStore.existingManifest(in: out) {
                    progressBar.update(done: manifest.finished.count, total: manifest.layers.count)
                }
                Thread.sleep(forTimeInterval: 0.2)
            }
            if let manifest = CheckpointStore.existingManifest(in: out) {
                progressBar.update(done: manifest.finished.count, total: manifest.layers.count)
            }
            progressBar.finish()
            CLILog.beforeWrite = {}
        }
        coordinator.waitUntilExit()
        for process in workerProcesses {
            // Workers exit on JobDone; if the coordinator failed they may still be retrying.
            if coordinator.terminationStatus != 0, process.isRunning { process.terminate() }
            process.waitUntilExit()
        }
        printTable(scratch: scratch, workers: workers)
        let failed = ([coordinator] + workerProcesses).filter { $0.terminationStatus != 0 }
        if !failed.isEmpty {
            log("lora-ga local: \(failed.count) process(es) failed (see their messages above)")
            // The coordinator's status says what happened to the job; a worker's when it alone failed.
            throw ExitCode(failed[0].terminationStatus)
        }
        log("lora-ga local: adapter in \(out)/\(PEFTAdapter.weightsFileName); check it with: lora-ga verify --adapter \(out) \(paths.joined(separator: " "))")
    }

    /// The daemons log like this command.
    private func childLogArguments(quiet: Bool) -> [String] {
        ["--log-level", quiet ? "warning" : logging.logLevel, "--log-format", logging.logFormat]
    }

    private func launch(_ executable: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        try process.run()
        return process
    }

    private func printTable(scratch: URL, workers: Int) {
        let roles = ["coordinator"] + (0..<workers).map { "worker\($0)" }
        var lines = ["| process | wall s | CPU s | peak RSS MB | payload MB | % of its gradient files |", "|---|---|---|---|---|---|"]
        for role in roles {
            guard let summary = try? ProcessSummary.read(from: scratch.appendingPathComponent("\(role).json").path) else { continue }
            let share = summary.inputBytes.map { $0 > 0 ? String(format: "%.2f%%", 100 * Double(summary.bytes) / Double($0)) : "–" } ?? "–"
            lines.append(String(format: "| %@ | %.2f | %.2f | %.1f | %.1f | %@ |", role as NSString, summary.seconds, summary.cpuSeconds,
                                Double(summary.peakResidentBytes) / 1e6, Double(summary.bytes) / 1e6, share as NSString))
        }
        print(lines.joined(separator: "\n"))
    }
}
