import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGADaemon
import Logging

@main
struct LoraGA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-ga",
        abstract: "LoRA-GA initializations from summed gradients, by randomized truncated SVD.",
        discussion: """
            Gradients are safetensors files (F32, F16, BF16, F64), one per worker or micro-batch, \
            each holding per-layer tensors [out, in] named like the module weight \
            (e.g. encoder.layer.0.attention.self.query.weight). Tensors with the same name are summed. \
            A tensor may hold a block of its layer (sharded training ranks): the file's metadata \
            "lora_ga.blocks" = {"<tensor>": {"shape": [OUT, IN], "offset": [ROW0, COL0]}} places it; \
            blocks add where they overlap, and a layer they leave partly uncovered is refused \
            unless --allow-uncovered.

            Every subcommand takes --log-level and --log-format text|json. init and local read \
            their settings like lora-ga-coord: flags, then LORA_GA_<NAME> environment variables, \
            then a --config JSON file; a setting they share with it is the same setting.

            Typical use:
              lora-ga init --rank 8 --out adapter/ grads/worker0 grads/worker1
              lora-ga verify --adapter adapter/ grads/worker0 grads/worker1

            \(ExitStatus.helpText)
            """,
        subcommands: [InitCommand.self, LocalCommand.self, VerifyCommand.self, InspectCommand.self, ExportCommand.self, SynthCommand.self])

    static func main() {
        var command: any ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            // --help and --version exit 0; every other parse or validation error is a usage error (2).
            if exitCode(for: error).isSuccess { exit(withError: error) }
            FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
            Foundation.exit(JobError.Kind.usage.exitCode)
        }
        var settings: ResolvedSettings?
        if let cataloged = command as? any CatalogCommand {
            do {
                settings = try ResolvedSettings(schema: type(of: cataloged).schema, arguments: cataloged.arguments,
                                                environment: ProcessInfo.processInfo.environment)
            } catch {
                let command = type(of: cataloged).schema.command, message = "\(error)"
                FileHandle.standardError.write(Data(((message.hasPrefix(command) ? "" : command + ": ") + message + "\n").utf8))
                Foundation.exit(ExitStatus.code(of: error))
            }
            CLILog.configure(settings!)
        } else if let logged = command as? LoggingCommand {
            CLILog.configure(logged.logging)
        }
        // Before any BLAS call and any other thread. Not for the parser's own commands
        // (`lora-ga local --help` parses to ArgumentParser's help).
        if !String(reflecting: type(of: command)).hasPrefix("ArgumentParser."), let note = BLAS.setUpForThisProcess() {
            log("lora-ga: \(note)")
        }
        do {
            if let settings, let cataloged = command as? any CatalogCommand {
                try cataloged.run(settings)
            } else {
                try command.run()
            }
        } catch let error as ExitCode {
            exit(withError: error)
        } catch let error as ValidationError {
            FileHandle.standardError.write(Data(("lora-ga: " + fullMessage(for: error) + "\n").utf8))
            Foundation.exit(JobError.Kind.usage.exitCode)
        } catch where exitCode(for: error).isSuccess {
            exit(withError: error)   // help printed by the parser's own command
        } catch {
            let kind = ExitStatus.kind(of: error)
            CLILog.write("error: \(error)", level: .error)
            Foundation.exit(kind.exitCode)
        }
    }
}

/// A subcommand with `--log-level` and `--log-format`.
protocol LoggingCommand {
    var logging: LogOptions { get }
}

/// `--log-level` and `--log-format` of the subcommands that are not ``CatalogCommand``s, with
/// the help and default of their declarations in ``SettingsCatalog/logging``.
struct LogOptions: ParsableArguments {
    static func declared(_ name: String) -> Setting { SettingsCatalog.logging.first { $0.name == name }! }

    @Option(help: ArgumentHelp(LogOptions.declared("log-level").help, valueName: "trace|debug|info|notice|warning|error|critical"))
    var logLevel: String = LogOptions.declared("log-level").defaultValue!
    @Option(help: ArgumentHelp(LogOptions.declared("log-format").help, valueName: "text|json"))
    var logFormat: String = LogOptions.declared("log-format").defaultValue!

    func validate() throws {
        _ = try DaemonLogging.level(logLevel, source: "--log-level")
        _ = try DaemonLogging.format(logFormat, source: "--log-format")
    }
}

/// Where `log` writes: stderr, as plain lines or JSON objects, above a level.
enum CLILog {
    nonisolated(unsafe) static var level: Logger.Level = .info
    nonisolated(unsafe) static var format: LogFormat = .text
    /// Called before each line is written (the progress bar clears itself there).
    nonisolated(unsafe) static var beforeWrite: () -> Void = {}

    static func configure(_ options: LogOptions) {
        level = (try? DaemonLogging.level(options.logLevel, source: "--log-level")) ?? .info
        format = (try? DaemonLogging.format(options.logFormat, source: "--log-format")) ?? .text
    }

    static func configure(_ settings: ResolvedSettings) {
        level = settings.text("log-level").flatMap { try? DaemonLogging.level($0.value, source: $0.source) } ?? .info
        format = settings.text("log-format").flatMap { try? DaemonLogging.format($0.value, source: $0.source) } ?? .text
    }

    static func write(_ line: String, level messageLevel: Logger.Level = .info) {
        guard messageLevel >= level else { return }
        beforeWrite()
        switch format {
        case .text:
            FileHandle.standardError.write(Data((line + "\n").utf8))
        case .json:
            let fields = ["ts": JSONLogHandler.timestamp(), "level": messageLevel.rawValue, "label": "lora-ga", "msg": line]
            FileHandle.standardError.write(Data((JSONLogHandler.line(fields) + "\n").utf8))
        }
    }
}

/// Progress and diagnostics go to stderr so stdout stays parseable.
func log(_ line: String) {
    CLILog.write(line)
}
