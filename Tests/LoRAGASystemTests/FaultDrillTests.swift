import Foundation
import Testing
import LoRAGAFormats

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

    @Test(arguments: [("dense", TensorDType.bf16), ("power", .bf16), ("dense", .f32)])
    func killedWorkersAndCoordinatorsLoseNothing(mode: String, files: TensorDType) throws {
        let coordinator = Self.binaries.appendingPathComponent("lora-ga-coord").path
        try #require(FileManager.default.isExecutableFile(atPath: coordinator), "build the executables first (swift build): \(coordinator) is missing")
        let script = Fixtures.root.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Scripts/fault-drill").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script, "--bin", Self.binaries.path, "--mode", mode, "--rate", "5", "--work", try Fixtures.scratch("drill-\(mode)-\(files)")]
            + (files == .f32 ? try Self.f32Workers() : Fixtures.minilmWorkers)
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let table = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(table)")
        let rows = table.split(separator: "\n").filter { $0.contains("SIGKILL") }
        #expect(rows.count == 3, "\(table)")
        for row in rows {
            #expect(row.contains("| yes |") && row.contains("| 0 |") && row.contains("| yes (worst ratio"), "\(row)")
        }
    }
}
