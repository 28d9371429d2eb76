import Foundation
import Testing
import LoRAGACore
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
        #expect(error?.message == "LORA_GA_RANK: 'eight' is not a valid rank")
        let missing = #expect(throws: JobError.self) { _ = try CoordinatorSettings(flags: ["out": "/o"], layers: try LayeredSettings(configFile: nil, environment: [:])) }
        #expect(missing?.message.contains("LORA_GA_WORKERS") == true)
        #expect(throws: JobError.self) { _ = try self.layers(configFile: #"{"workers": [1, 2]}"#) }
        #expect(throws: JobError.self) { _ = try LayeredSettings(configFile: "/nonexistent/config.json", environment: [:]) }
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
}
