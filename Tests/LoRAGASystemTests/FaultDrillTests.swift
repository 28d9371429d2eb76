import Foundation
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator

/// Crash recovery over real processes: `Scripts/fault-drill` kills a worker, the coordinator,
/// and both, with SIGKILL mid-job, restarts them, and demands the undisturbed run's adapter.
@Suite(.serialized) struct FaultDrillTests {
    /// The built executables sit next to the test bundle.
    static var binaries: URL {
        URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    }

    /// F32 copies of the MiniLM workers' BF16 files: a worker with one F32 file sends its rows
    /// by `sendfile` from the file, the BF16 ones are converted into buffers — both paths crash.
    static func f32Workers() throws -> [String] {
        try Fixtures.minilmWorkers.enumerated().map { index, directory in
            let source = try SafeTensorsFile(path: directory + "/grads.safetensors")
            let target = try Fixtures.scratch("f32-w\(index)")
            try SafeTensorsWriter.write(path: target + "/grads.safetensors", tensors: source.tensors.map { info in
                (.init(name: info.name, dtype: .f32, shape: info.shape), try source.readAll(info.name))
            })
            return target
        }
    }

    /// The key=value lines `Scripts/fault-drill` writes for run NAME (a key may repeat).
    static func facts(_ work: String, _ name: String) throws -> [(key: String, value: String)] {
        try String(contentsOfFile: "\(work)/\(name).facts", encoding: .utf8).split(separator: "\n").map { line in
            let parts = line.split(separator: "=", maxSplits: 1)
            return (String(parts[0]), parts.count > 1 ? String(parts[1]) : "")
        }
    }

    @Test(arguments: [("dense", TensorDType.bf16), ("power", .bf16), ("dense", .f32)])
    func killedWorkersAndCoordinatorsLoseNothing(mode: String, files: TensorDType) throws {
        let coordinator = Self.binaries.appendingPathComponent("lora-ga-coord").path
        try #require(FileManager.default.isExecutableFile(atPath: coordinator), "build the executables first (swift build): \(coordinator) is missing")
        let script = Fixtures.root.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Scripts/fault-drill").path
        let work = try Fixtures.scratch("drill-\(mode)-\(files)")
        let gradients = files == .f32 ? try Self.f32Workers() : Fixtures.minilmWorkers
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script, "--bin", Self.binaries.path, "--mode", mode, "--rate", "5", "--work", work] + gradients
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let table = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(table)")

        let baseline = try Data(contentsOf: URL(fileURLWithPath: "\(work)/baseline/adapter_model.safetensors"))
        let layerCount = try GradientFileSet(paths: gradients).layers.count
        for fault in ["worker", "coordinator", "both"] {
            let name = "kill-\(fault)"
            let facts = try Self.facts(work, name)
            let fact = { (key: String) in facts.first { $0.key == key }?.value }
            #expect(fact("exit") == "0", "\(name): the job did not finish (see \(work)/\(name).log)")
            if fault != "coordinator" {
                // The worker was killed while the job still needed it.
                #expect(fact("worker_killed_while_running") == "yes" && fact("adapter_before_worker_kill") == "no", "\(name): \(facts)")
            }
            if fault != "worker" {
                #expect(fact("coordinator_killed_while_running") == "yes" && fact("adapter_before_coordinator_kill") == "no", "\(name): \(facts)")
                // Killed mid-job: some layers finished, not all; the restarted coordinator keeps
                // those checkpoints (same files, same inodes) instead of computing them again.
                let checkpoints = facts.filter { $0.key == "checkpoint_at_coordinator_kill" }.map(\.value)
                #expect(checkpoints.count > 0 && checkpoints.count < layerCount, "\(name): \(checkpoints.count) of \(layerCount) layers checkpointed at the kill")
                for checkpoint in checkpoints {
                    let parts = checkpoint.split(separator: " ", maxSplits: 1).map(String.init)
                    let inode = (try? FileManager.default.attributesOfItem(atPath: parts[1]))?[.systemFileNumber] as? NSNumber
                    #expect(inode.map { "\($0)" } == parts[0], "\(name): \(parts[1]) was rewritten after the restart")
                }
            }
            // Nothing lost: the undisturbed run's adapter, byte for byte, and every layer verified.
            let adapter = "\(work)/\(name)"
            #expect(try Data(contentsOf: URL(fileURLWithPath: adapter + "/adapter_model.safetensors")) == baseline, "\(name): adapter differs from the undisturbed run's")
            let results = try AdapterVerifier(files: GradientFileSet(paths: gradients), adapterDirectory: adapter, plantedSpectrumPaths: []).verify()
            #expect(results.count == layerCount)
            for result in results { #expect(result.ratio <= 1.01, "\(name) \(result.name): \(result.ratio)") }
        }
    }
}
