import Foundation
import Testing
import LoRAGACore
import LoRAGADaemon
@testable import LoRAGACoordinator

/// Daemon settings: flags > LORA_GA_* environment > JSON config file > defaults.
@Suite struct SettingsTests {
    /// Settings layered over a config file holding `json` (the file is removed afterwards).
    func layers(configFile json: String, environment: [String: String] = [:]) throws -> LayeredSettings {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("lora-ga-config-\(UUID().uuidString).json").path
        try json.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        return try LayeredSettings(configFile: path, environment: environment)
    }

    @Test func flagsBeatEnvironmentWhichBeatsTheFileWhichBeatsDefaults() throws {
        let layers = try self.layers(configFile: #"{"_comment": "x", "workers": 4, "rank": 16, "mode": "power", "out": "/file", "rslora": true, "listen": "127.0.0.1:9000"}"#,
                                environment: ["LORA_GA_RANK": "32", "LORA_GA_OUT": "/env"])
        let settings = try CoordinatorSettings(flags: ["out": "/flag"], layers: layers)
        #expect(settings.options.outputDirectory == "/flag")             // flag
        #expect(settings.options.settings.lora.rank == 32)               // environment
        #expect(settings.options.expectedWorkers == 4)                   // file
        #expect(settings.options.settings.mode == .power)                // file
        #expect(settings.options.settings.lora.useRSLoRA)                // file boolean
        #expect(settings.port == 9000)
        #expect(settings.options.settings.lora.alpha == 64)              // default: 2r
        #expect(settings.options.window == 2)                            // default
    }

    @Test func badValuesNameTheirSource() throws {
        let layers = try LayeredSettings(configFile: nil, environment: ["LORA_GA_RANK": "eight"])
        let error = #expect(throws: JobError.self) { _ = try CoordinatorSettings(flags: ["workers": "2", "out": "/o"], layers: layers) }
        #expect(error?.message.hasPrefix("LORA_GA_RANK: 'eight' is not a valid rank") == true, "\(error?.message ?? "")")
        let missing = #expect(throws: JobError.self) { _ = try CoordinatorSettings(flags: ["out": "/o"], layers: try LayeredSettings(configFile: nil, environment: [:])) }
        #expect(missing?.message.contains("LORA_GA_WORKERS") == true)
        #expect(throws: JobError.self) { _ = try self.layers(configFile: #"{"workers": [1, 2]}"#) }
        #expect(throws: JobError.self) { _ = try LayeredSettings(configFile: "/nonexistent/config.json", environment: [:]) }
    }

    @Test func dtypesAndTheModeParseIntoTheSharedEnumsInEitherCase() throws {
        let layers = try LayeredSettings(configFile: nil, environment: ["LORA_GA_PAYLOAD_DTYPE": "BF16", "LORA_GA_MODE": "Sketch"])
        let settings = try CoordinatorSettings(flags: ["workers": "2", "out": "/o", "adapter-dtype": "f16"], layers: layers)
        #expect(settings.options.payloadDType == .bf16)
        #expect(settings.options.adapterDType == .f16)
        #expect(settings.options.settings.mode == .sketch)
        for bad in ["f64", "I64", "float"] {
            let error = #expect(throws: JobError.self) {
                _ = try CoordinatorSettings(flags: ["workers": "2", "out": "/o", "payload-dtype": bad], layers: try LayeredSettings(configFile: nil, environment: [:]))
            }
            #expect(error?.message.contains("payload-dtype") == true, "\(error?.message ?? "")")
        }
    }

    @Test func addressesParse() throws {
        #expect(try LayeredSettings.hostAndPort("[::1]:7070", setting: "listen") == ("::1", 7070))
        #expect(throws: JobError.self) { _ = try LayeredSettings.hostAndPort("localhost", setting: "listen") }
        #expect(throws: JobError.self) { _ = try LayeredSettings.hostAndPort(":7070", setting: "listen") }
    }

    @Test func shippedConfigFilesParse() throws {
        let config = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Config")
        let coordinator = try LayeredSettings(configFile: config.appendingPathComponent("coordinator.json").path, environment: [:])
        let settings = try CoordinatorSettings(flags: ["insecure": "true"], layers: coordinator)
        #expect(settings.options.expectedWorkers == 4 && settings.options.settings.lora.rank == 16)
        _ = try LayeredSettings(configFile: config.appendingPathComponent("worker.json").path, environment: [:])
    }

    // MARK: - Declared once, strict

    @Test func unknownConfigKeyIsAnErrorNamingItAndTheClosestValidKey() throws {
        let layers = try self.layers(configFile: #"{"workers": 2, "out": "/o", "rnak": 16}"#)
        let error = #expect(throws: JobError.self) { _ = try CoordinatorSettings(flags: [:], layers: layers) }
        #expect(error?.kind == .usage && error?.kind.exitCode == 2)
        #expect(error?.message.contains("unknown key 'rnak'") == true, "\(error?.message ?? "")")
        #expect(error?.message.contains("did you mean 'rank'") == true, "\(error?.message ?? "")")
        // A worker's config file is checked against the worker's settings.
        let worker = try self.layers(configFile: #"{"grads": "/g", "conect": "127.0.0.1:1"}"#)
        let workerError = #expect(throws: JobError.self) { try SettingsCatalog.worker.validate(worker) }
        #expect(workerError?.message.contains("did you mean 'connect'") == true, "\(workerError?.message ?? "")")
    }

    @Test func unknownLoraGAEnvironmentVariableIsAnErrorNamingTheClosestOne() throws {
        let layers = try LayeredSettings(configFile: nil, environment: ["LORA_GA_RNAK": "16", "LORA_GA_WORKERS": "2", "LORA_GA_OUT": "/o"])
        let error = #expect(throws: JobError.self) { _ = try CoordinatorSettings(flags: [:], layers: layers) }
        #expect(error?.kind == .usage)
        #expect(error?.message.contains("LORA_GA_RNAK") == true && error?.message.contains("did you mean LORA_GA_RANK") == true, "\(error?.message ?? "")")
        // One environment serves a coordinator and its workers: another executable's settings
        // and the scripts' variables are fine; other variables are none of lora-ga's business.
        let shared = try LayeredSettings(configFile: nil, environment: [
            "LORA_GA_WORKERS": "2", "LORA_GA_OUT": "/o", "LORA_GA_CONNECT": "h:1", "LORA_GA_GRADS": "/g", "LORA_GA_BIN": "/bin", "PATH": "/usr/bin",
        ])
        #expect(try CoordinatorSettings(flags: [:], layers: shared).options.expectedWorkers == 2)
    }

    @Test func commandLineIsParsedFromTheDeclarations() throws {
        let schema = SettingsCatalog.coordinator
        let parsed = try schema.parse(arguments: ["--workers", "3", "-o", "/out", "--rank=16", "--rslora", "--compress=false"])
        #expect(parsed["workers"] == ["3"] && parsed["out"] == ["/out"] && parsed["rank"] == ["16"] && parsed["rslora"] == ["true"] && parsed["compress"] == ["false"])
        let typo = #expect(throws: JobError.self) { _ = try schema.parse(arguments: ["--rnak", "8"]) }
        #expect(typo?.kind == .usage && typo?.message.contains("did you mean --rank?") == true, "\(typo?.message ?? "")")
        #expect(throws: JobError.self) { _ = try schema.parse(arguments: ["--rank", "eight"]) }
        #expect(throws: JobError.self) { _ = try schema.parse(arguments: ["--mode", "fast"]) }
        #expect(throws: JobError.self) { _ = try schema.parse(arguments: ["--rank"]) }
        #expect(throws: JobError.self) { _ = try schema.parse(arguments: ["stray"]) }
        // The worker's --grads repeats; in the environment it is a comma-separated list.
        let worker = try ResolvedSettings(schema: SettingsCatalog.worker, arguments: ["--grads", "/a", "--grads", "/b"], environment: [:])
        #expect(worker.list("grads") == ["/a", "/b"])
        let fromEnvironment = try ResolvedSettings(schema: SettingsCatalog.worker, arguments: [], environment: ["LORA_GA_GRADS": "/a, /b"])
        #expect(fromEnvironment.list("grads") == ["/a", "/b"])
    }

    @Test func precedenceHoldsThroughTheCommandLine() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("lora-ga-config-\(UUID().uuidString).json").path
        try #"{"workers": 4, "rank": 16, "out": "/file", "window": 3}"#.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let resolved = try ResolvedSettings(schema: SettingsCatalog.coordinator, arguments: ["--config", path, "--out", "/flag"],
                                            environment: ["LORA_GA_RANK": "32", "LORA_GA_WORKERS": "5"])
        let settings = try CoordinatorSettings(resolved)
        #expect(settings.options.outputDirectory == "/flag")           // flag over file
        #expect(settings.options.settings.lora.rank == 32)             // environment over file
        #expect(settings.options.expectedWorkers == 5)                 // environment over file
        #expect(settings.options.window == 3)                          // file over default
        #expect(settings.options.gatherTimeout == .seconds(600))       // declared default
        #expect(resolved.text("rank")?.source == "LORA_GA_RANK")
        #expect(resolved.text("gather-timeout")?.source == "default of --gather-timeout")
    }

    @Test func helpIsGeneratedFromEveryDeclaration() {
        for schema in [SettingsCatalog.coordinator, SettingsCatalog.worker] {
            let help = schema.helpText()
            for setting in schema.settings {
                #expect(help.contains("--\(setting.name)") && help.contains(setting.environmentName) && help.contains(setting.help), "\(schema.command): \(setting.name)")
            }
            #expect(schema.setting("log-level") != nil && schema.setting("log-format") != nil && schema.setting("metrics-listen") != nil)
        }
        #expect(ExitStatus.helpText.contains("75") && ExitStatus.helpText.contains("  4 "))
    }

    // MARK: - Shared by the lora-ga subcommands and the daemons

    @Test func aSettingSeveralExecutablesHaveIsOneDeclaration() {
        // The coordinator's and the worker's TLS files are different things under one name;
        // neither passes settings to the other. `lora-ga local` passes to both.
        let pairs = [(SettingsCatalog.initCommand, SettingsCatalog.localCommand), (SettingsCatalog.initCommand, SettingsCatalog.coordinator),
                     (SettingsCatalog.localCommand, SettingsCatalog.coordinator), (SettingsCatalog.localCommand, SettingsCatalog.worker),
                     (SettingsCatalog.initCommand, SettingsCatalog.verifyCommand), (SettingsCatalog.localCommand, SettingsCatalog.verifyCommand)]
        for (schema, other) in pairs {
            for setting in schema.settings {
                guard let theirs = other.setting(setting.name) else { continue }
                #expect(theirs == setting, "\(schema.command) and \(other.command) declare --\(setting.name) differently")
            }
        }
        for schema in [SettingsCatalog.initCommand, SettingsCatalog.localCommand, SettingsCatalog.coordinator] {
            for setting in SettingsCatalog.factors + [SettingsCatalog.out, SettingsCatalog.restart, SettingsCatalog.adapterDType] {
                #expect(schema.setting(setting.name) == setting, "\(schema.command) lacks --\(setting.name)")
            }
        }
    }

    @Test func subcommandsTakePathsAsOperands() throws {
        let settings = try ResolvedSettings(schema: SettingsCatalog.initCommand, arguments: ["a", "--rank", "4", "b", "--", "--c"], environment: [:])
        #expect(settings.operands == ["a", "b", "--c"])
        #expect(try settings.required("rank", as: Int.self) == 4)
        // The daemons take none.
        #expect(throws: JobError.self) { _ = try ResolvedSettings(schema: SettingsCatalog.coordinator, arguments: ["a"], environment: [:]) }
    }

    @Test func localHandsItsSettingsOnAsTheSameSettings() throws {
        let local = try ResolvedSettings(schema: SettingsCatalog.localCommand,
                                         arguments: ["--rank", "4", "--mode", "sketch", "--out", "/o", "--allow-uncovered", "/g"],
                                         environment: ["LORA_GA_SEED": "9", "LORA_GA_GATHER_TIMEOUT": "30", "LORA_GA_BIN": "/bin"])
        let passed = try local.passed(to: SettingsCatalog.coordinator, overriding: ["workers": ["3"], "listen": ["127.0.0.1:0"]])
        let coordinator = try CoordinatorSettings(passed)
        #expect(coordinator.options.settings.lora.rank == 4 && coordinator.options.settings.mode == .sketch)
        #expect(coordinator.options.settings.seed == 9 && coordinator.options.expectedWorkers == 3 && coordinator.options.outputDirectory == "/o")
        #expect(coordinator.options.settings == (try local.jobSettings(microBatches: 1)))
        // Given values only, as LORA_GA_* variables; the defaults are the child's own (the same declarations).
        let variables = try passed.environmentVariables()
        #expect(variables["LORA_GA_RANK"] == "4" && variables["LORA_GA_SEED"] == "9" && variables["LORA_GA_WORKERS"] == "3")
        #expect(variables["LORA_GA_ALPHA"] == nil && variables["LORA_GA_WINDOW"] == nil)
        // The child's environment: local's own settings replaced by what it passes; a setting
        // only the child has, and the scripts' variables, still reach it.
        let environment = try local.environment(for: passed, inheriting: ["LORA_GA_SEED": "9", "LORA_GA_MODE": "dense", "LORA_GA_GATHER_TIMEOUT": "30",
                                                                           "LORA_GA_BIN": "/bin", "PATH": "/usr/bin"])
        #expect(environment["LORA_GA_MODE"] == "sketch" && environment["LORA_GA_GATHER_TIMEOUT"] == "30" && environment["LORA_GA_BIN"] == "/bin")
        #expect(try ResolvedSettings(schema: SettingsCatalog.coordinator, arguments: [], environment: environment).text("rank")?.value == "4")
    }

    @Test func badSharedValuesNameTheSetting() throws {
        let mode = #expect(throws: JobError.self) {
            _ = try ResolvedSettings(schema: SettingsCatalog.initCommand, arguments: ["--mode", "fast"], environment: [:])
        }
        #expect(mode?.kind == .usage && mode?.message.contains("--mode: 'fast' is not a valid mode") == true, "\(mode?.message ?? "")")
        let rank = try ResolvedSettings(schema: SettingsCatalog.localCommand, arguments: ["--rank", "0"], environment: [:])
        let invalid = #expect(throws: JobError.self) { _ = try rank.jobSettings(microBatches: 1) }
        #expect(invalid?.message.contains("--rank must be at least 1") == true, "\(invalid?.message ?? "")")
    }

    @Test func editDistanceCountsASwapOnce() {
        #expect(SettingsSchema.editDistance("rnak", "rank") == 1)
        #expect(SettingsSchema.editDistance("window", "window") == 0)
        #expect(SettingsSchema.closest(to: "gather-timout", among: SettingsCatalog.coordinator.names) == "gather-timeout")
        #expect(SettingsSchema.closest(to: "zzzzzzzz", among: SettingsCatalog.coordinator.names) == nil)
    }
}
