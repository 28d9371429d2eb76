import Foundation
import Testing

/// Crash recovery over real processes: `Scripts/fault-drill` kills a worker, the coordinator,
/// and both, with SIGKILL mid-job, restarts them, and demands the undisturbed run's adapter.
@Suite(.serialized) struct FaultDrillTests {
    /// The built executables sit next to the test bundle.
    static var binaries: URL {
        URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    }

    @Test(arguments: ["dense", "power"])
    func killedWorkersAndCoordinatorsLoseNothing(mode: String) throws {
        let coordinator = Self.binaries.appendingPathComponent("lora-ga-coord").path
        try #require(FileManager.default.isExecutableFile(atPath: coordinator), "build the executables first (swift build): \(coordinator) is missing")
        let script = Fixtures.root.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Scripts/fault-drill").path
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [script, "--bin", Self.binaries.path, "--mode", mode, "--rate", "5", "--work", try Fixtures.scratch("drill-\(mode)")]
            + Fixtures.minilmWorkers
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
