import Foundation
import Testing
import LoRAGADaemon
import LoRAGAFormats

/// `lora-ga init`, `lora-ga local` and lora-ga-coord read their shared settings from one
/// declaration each: the same entry in every `--help`, the same errors, and `local` hands
/// them to its coordinator and workers as settings. Real processes.
@Suite(.serialized) struct CLISettingsTests {
    /// The text `executable arguments` prints on stdout, with every run of whitespace made one
    /// space (ArgumentParser re-wraps the discussion to its width).
    static func help(_ executable: String, _ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = FaultDrillTests.binaries.appendingPathComponent(executable)
        process.arguments = arguments
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(executable) \(arguments)")
        return normalized(text)
    }

    static func normalized(_ text: String) -> String {
        text.split(whereSeparator: \.isWhitespace).joined(separator: " ")
    }

    @Test func everySharedSettingHasTheSameEntryInEveryHelp() throws {
        let helps = [
            "lora-ga init": try Self.help("lora-ga", ["init", "--help"]),
            "lora-ga local": try Self.help("lora-ga", ["local", "--help"]),
            "lora-ga-coord": try Self.help("lora-ga-coord", ["--help"]),
        ]
        let schemas = [SettingsCatalog.initCommand, SettingsCatalog.localCommand, SettingsCatalog.coordinator]
        var checked = 0
        for setting in Set(schemas.flatMap(\.settings)) {
            let declaredBy = schemas.filter { $0.setting(setting.name) != nil }
            guard declaredBy.count >= 2 else { continue }
            let entry = Self.normalized(setting.helpLines.joined(separator: " "))
            for schema in declaredBy {
                #expect(helps[schema.command]!.contains(entry), "\(schema.command) --help lacks the entry of --\(setting.name): \(entry)")
            }
            checked += 1
        }
        // The factor settings, out, restart, adapter-dtype, workers, window, payload-dtype,
        // compress, the logging settings, config.
        #expect(checked >= SettingsCatalog.factors.count + 10, "\(checked)")
        #expect(helps["lora-ga init"]!.contains("ARGUMENTS <paths> ..."))
    }

    @Test func aBadValueNamesTheSettingAndExits2() throws {
        let scratch = try Fixtures.scratch()
        let grads = try OperationsTests.gradients(scratch + "/g")
        let cases: [(arguments: [String], environment: [String: String], says: String)] = [
            (["init", "--mode", "fast", "--out", scratch + "/o", grads], [:], "--mode: 'fast' is not a valid mode"),
            (["local", "--rank", "eight", "--out", scratch + "/o", grads], [:], "--rank: 'eight' is not a valid rank"),
            (["init", "--rank", "0", "--out", scratch + "/o", grads], [:], "--rank must be at least 1"),
            (["local", "--rnak", "4", "--out", scratch + "/o", grads], [:], "did you mean --rank?"),
            (["init", "--out", scratch + "/o", grads], ["LORA_GA_PASSES": "two"], "LORA_GA_PASSES: 'two' is not a valid passes"),
            (["local", "--out", scratch + "/o", grads], ["LORA_GA_RNAK": "4"], "did you mean LORA_GA_RANK"),
            (["init", "--out", scratch + "/o"], [:], "give the gradient files"),
        ]
        for (arguments, environment, says) in cases {
            let run = try Daemon.run("lora-ga", arguments, environment: environment, scratch: scratch)
            #expect(run.status == 2 && run.stderr.contains(says), "\(arguments) \(environment): \(run)")
        }
        #expect(!FileManager.default.fileExists(atPath: scratch + "/o"))
    }

    /// Non-default settings from all three layers (flags, LORA_GA_* environment, config file)
    /// reach the coordinator `local` starts and show in what it writes.
    @Test func localPassesItsSettingsToTheDaemons() throws {
        let scratch = try Fixtures.scratch()
        let grads = [try OperationsTests.gradients(scratch + "/w0"), try OperationsTests.gradients(scratch + "/w1")]
        try #"{"direction": "A2rBr", "window": 1}"#.write(toFile: scratch + "/job.json", atomically: true, encoding: .utf8)
        let out = scratch + "/adapter"
        let run = try Daemon.run("lora-ga", [
            "local", "--workers", "2", "--rank", "3", "--alpha", "5", "--rslora", "--mode", "dense", "--oversampling", "4",
            "--seed", "11", "--adapter-dtype", "bf16", "--payload-dtype", "bf16", "--config", scratch + "/job.json", "--out", out,
        ] + grads, environment: ["LORA_GA_PASSES": "3", "LORA_GA_GATHER_TIMEOUT": "30"], scratch: scratch)
        #expect(run.status == 0, "\(run)")

        let config = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/adapter_config.json"))) as? [String: Any])
        #expect(config["r"] as? Int == 3 && config["lora_alpha"] as? Double == 5 && config["use_rslora"] as? Bool == true, "\(config)")
        let method = try #require(config["lora_ga"] as? [String: Any])
        #expect(method["direction"] as? String == "A2rBr", "\(method)")

        let report = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/lora_ga_report.json"))) as? [String: Any])
        let settings = try #require(report["settings"] as? [String: Any])
        #expect(settings["mode"] as? String == "dense" && settings["passes"] as? Int == 3
                && settings["oversampling"] as? Int == 4 && settings["seed"] as? Int == 11, "\(settings)")
        let layers = try #require(report["layers"] as? [[String: Any]])
        #expect(layers.count == 2 && layers.allSatisfy { $0["mode"] as? String == "dense" })

        let adapter = try SafeTensorsFile(path: out + "/" + PEFTAdapter.weightsFileName)
        #expect(adapter.tensors.count == 4 && adapter.tensors.allSatisfy { $0.dtype == .bf16 }, "\(adapter.tensors)")
        #expect(adapter.tensors.filter { $0.name.hasSuffix("lora_A.weight") }.allSatisfy { $0.shape[0] == 3 })
    }
}
