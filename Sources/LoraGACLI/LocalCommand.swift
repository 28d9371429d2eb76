import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGADaemon

struct LocalCommand: CatalogCommand {
    static let schema = SettingsCatalog.localCommand
    static let configuration = CommandConfiguration(
        commandName: "local",
        abstract: "Run the distributed job on this machine: one lora-ga-coord and N lora-ga-worker processes over loopback TCP.",
        usage: usage,
        discussion: discussion("""
            The gradient files under PATH… are dealt out round-robin to the workers (give N \
            directories for N workers to keep each worker's files together). The coordinator \
            writes the adapter and checkpoints to OUT; at the end a table shows every process's \
            peak memory and traffic. The coordinator and workers receive these settings as \
            their own (the same declarations), through their LORA_GA_* environment.

            Example: lora-ga local --workers 2 --rank 8 --out adapter/ grads/worker0 grads/worker1
            """))

    /// Every setting is declared in ``SettingsCatalog/localCommand``; it parses them.
    @Argument(parsing: .allUnrecognized, help: .hidden) var arguments: [String] = []

    func run(_ resolved: ResolvedSettings) throws {
        let workers: Int = try resolved.value("workers") ?? 2
        guard workers >= 1 else { throw JobError(.usage, "--workers must be at least 1") }
        let out: String = try resolved.required("out")
        let paths = try resolved.gradientPaths()
        let directory = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        let coordinatorPath = directory.appendingPathComponent("lora-ga-coord").path
        let workerPath = directory.appendingPathComponent("lora-ga-worker").path
        for path in [coordinatorPath, workerPath] where !FileManager.default.isExecutableFile(atPath: path) {
            throw ValidationError("\(path) not found: build every product (swift build -c release) so the daemons sit next to lora-ga")
        }
        let files = try GradientFileSet.expand(paths)
        // Each worker holds its share and cannot see the others' blocks: check the whole set's
        // shapes, blocks and coverage here, before any process starts (headers only).
        let fileSet = try GradientFileSet(paths: paths, uncovered: try resolved.flag("allow-uncovered") ? .zero : .refused)
        // On a terminal the daemons only warn, and this draws their progress from the job's manifest.
        let progressBar = resolved.logsAsText ? ProgressBar.forTerminal(total: 0) : nil
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
        // The daemons get every setting given here as the same setting, plus the job's wiring.
        let settings = try resolved.jobSettings(readingMicroBatchesFrom: { fileSet.files })
        let quiet = progressBar != nil ? ["log-level": ["warning"]] : [:]
        let coordinatorSettings = try resolved.passed(to: SettingsCatalog.coordinator, overriding: [
            "listen": ["127.0.0.1:0"], "port-file": [portFile], "workers": ["\(workers)"], "secret-file": [secretFile],
            "micro-batches": ["\(settings.lora.microBatches)"],
            "summary-file": [scratch.appendingPathComponent("coordinator.json").path],
        ].merging(quiet) { $1 })
        _ = try CoordinatorSettings(coordinatorSettings)   // refused here rather than by the child

        log("lora-ga local: 1 coordinator + \(workers) workers on loopback, \(files.count) gradient files, mode \(settings.mode.rawValue), rank \(settings.lora.rank) → \(out)")
        let coordinator = try launch(coordinatorPath, coordinatorSettings, from: resolved)
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
            let workerSettings = try resolved.passed(to: SettingsCatalog.worker, overriding: [
                "connect": ["127.0.0.1:\(port!)"], "id": ["worker\(index)"], "secret-file": [secretFile], "grads": share,
                "summary-file": [scratch.appendingPathComponent("worker\(index).json").path],
            ].merging(quiet) { $1 })
            return try launch(workerPath, workerSettings, from: resolved)
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

    /// Starts a daemon that reads `settings` from its environment, and no arguments.
    private func launch(_ executable: String, _ settings: ResolvedSettings, from resolved: ResolvedSettings) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = []
        process.environment = try resolved.environment(for: settings, inheriting: ProcessInfo.processInfo.environment)
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
