import Foundation
import Testing
@testable import LoRAGACore
@testable import LoRAGADaemon

/// The executables run vector kernels wherever the CPU has them, even when OpenBLAS
/// falls back to generic ones (OpenBLAS 0.3.21 on Sapphire/Emerald Rapids: 4–5× slower GEMMs).
@Suite struct BLASKernelSelectionTests {
    func machineReport(environment: [String: String]) throws -> [String: Any] {
        let binary = FaultDrillTests.binaries.appendingPathComponent("lora-ga-bench").path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "build the executables first (swift build): \(binary) is missing")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["machine", "--shapes", "64x64", "--k", "8", "--seconds", "0.01", "--loopback-mib", "0"]
        process.environment = ProcessInfo.processInfo.environment.filter { $0.key != "OPENBLAS_CORETYPE" }.merging(environment) { $1 }
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        try #require(process.terminationStatus == 0)
        return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    @Test("lora-ga runs AVX2-or-better kernels on a CPU with AVX2")
    func vectorKernels() throws {
        let flags = BLASKernels.cpuFlags()
        let report = try machineReport(environment: [:])
        let core = try #require(report["openblas_core"] as? String)
        if flags.contains("avx2") && flags.contains("fma") {
            #expect(BLASKernels.vectorCores.contains(core.lowercased()), "OpenBLAS core \(core) on a CPU with AVX2")
        }
        if let chosen = report["openblas_core_chosen_by_openblas"] as? String {
            #expect(!BLASKernels.vectorCores.contains(chosen.lowercased()), "switched away from \(chosen), a vector core")
        }
    }

    @Test("OPENBLAS_CORETYPE set by the user is obeyed")
    func userChoice() throws {
        let report = try machineReport(environment: ["OPENBLAS_CORETYPE": "Prescott"])
        #expect(report["openblas_core"] as? String == "Prescott")
        #expect(report["openblas_core_chosen_by_openblas"] == nil)
        #expect((report["environment"] as? [String: String])?["OPENBLAS_CORETYPE"] == "Prescott")
    }

    /// Runs `executable` with `arguments` (OPENBLAS_CORETYPE unset); its exit status and stderr.
    func stderr(of arguments: [String], executable: String = "lora-ga") throws -> (status: Int32, text: String) {
        let binary = FaultDrillTests.binaries.appendingPathComponent(executable).path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "build the executables first (swift build): \(binary) is missing")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        process.environment = ProcessInfo.processInfo.environment.filter { $0.key != "OPENBLAS_CORETYPE" }
        let errors = Pipe()
        process.standardOutput = FileHandle.nullDevice
        process.standardError = errors
        try process.run()
        let data = errors.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test("--help says nothing about BLAS kernels, where a real command would")
    func helpIsQuiet() throws {
        let note = "set OPENBLAS_CORETYPE to choose yourself"
        let machine = try stderr(of: ["machine", "--shapes", "64x64", "--k", "8", "--seconds", "0.01", "--loopback-mib", "0"], executable: "lora-ga-bench")
        #expect(machine.status == 0)
        for arguments in [["--help"], ["local", "--help"], ["help", "init"]] {
            let help = try stderr(of: arguments)
            #expect(help.status == 0, "\(arguments)")
            #expect(!help.text.contains(note), "\(arguments): \(help.text)")
        }
        let benchHelp = try stderr(of: ["machine", "--help"], executable: "lora-ga-bench")
        #expect(benchHelp.status == 0 && !benchHelp.text.contains(note), "\(benchHelp.text)")
        // Where OpenBLAS picks vector kernels itself there is no note to leave out.
        if try machineReport(environment: [:])["openblas_core_chosen_by_openblas"] != nil {
            #expect(machine.text.contains(note))
        }
    }

    /// Threads of a running `lora-ga-coord` named like its main thread: OpenBLAS's helpers
    /// inherit that name (Swift's and NIO's threads name themselves).
    func coordinatorMainNamedThreads(environment: [String: String]) throws -> Int {
        let binary = FaultDrillTests.binaries.appendingPathComponent("lora-ga-coord").path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "build the executables first (swift build): \(binary) is missing")
        let out = try Fixtures.scratch("helperThreads")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let portFile = out + "/port"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["--workers", "1", "--out", out + "/job", "--listen", "127.0.0.1:0", "--port-file", portFile]
        process.environment = ProcessInfo.processInfo.environment.filter { $0.key != "OPENBLAS_NUM_THREADS" }.merging(environment) { $1 }
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { process.terminate(); process.waitUntilExit() }
        let deadline = Date().addingTimeInterval(30)
        while !FileManager.default.fileExists(atPath: portFile) && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        try #require(FileManager.default.fileExists(atPath: portFile), "the coordinator did not start listening")
        let tasks = "/proc/\(process.processIdentifier)/task"
        return try FileManager.default.contentsOfDirectory(atPath: tasks).filter { task in
            (try? String(contentsOfFile: "\(tasks)/\(task)/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "lora-ga-coord"
        }.count
    }

    @Test("the daemons stop OpenBLAS's spinning helper threads unless more BLAS threads were asked for")
    func helperThreads() throws {
        #expect(try coordinatorMainNamedThreads(environment: [:]) == 1)
        if ProcessInfo.processInfo.activeProcessorCount >= 2 {   // OpenBLAS caps threads at the cores
            #expect(try coordinatorMainNamedThreads(environment: ["OPENBLAS_NUM_THREADS": "2"]) == 2)
        }
    }

    @Test("setting the BLAS thread count before work (init, workers, verify, bench) keeps the stopped helpers stopped")
    func helperThreadsStayStopped() throws {
        // `lora-ga-bench machine` calls BLAS.configureThreads like the others, then reports OpenBLAS's
        // own pool state. OpenBLAS 0.3.21 restarts the pool in any openblas_set_num_threads
        // after a shutdown, and the new helper spun on sched_yield for the whole run.
        let report = try machineReport(environment: [:])
        try #require(report["openblas_helper_threads"] is Bool, "this OpenBLAS does not export its thread-pool state")
        #expect(report["openblas_helper_threads"] as? Bool == false)
        if ProcessInfo.processInfo.activeProcessorCount >= 2 {
            #expect(try machineReport(environment: ["OPENBLAS_NUM_THREADS": "2"])["openblas_helper_threads"] as? Bool == true)
        }
    }
}
