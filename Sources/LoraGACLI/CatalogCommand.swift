import ArgumentParser
import Foundation
import LoRAGACore
import LoRAGADaemon
import LoRAGAFormats

/// A `lora-ga` subcommand whose settings are declared in ``SettingsCatalog``: ArgumentParser
/// only dispatches to it and prints its help; the catalog parses its arguments (flags, then
/// `LORA_GA_*` variables, then a `--config` file) exactly as the daemons do, so a setting it
/// shares with lora-ga-coord has the same name, default and help.
protocol CatalogCommand: ParsableCommand {
    static var schema: SettingsSchema { get }
    /// Everything after the subcommand's name, for ``schema`` to parse.
    var arguments: [String] { get }
    func run(_ settings: ResolvedSettings) throws
}

extension CatalogCommand {
    /// ``LoraGA/main()`` resolves the settings first (to configure logging) and calls `run(_:)`.
    func run() throws {
        try run(ResolvedSettings(schema: Self.schema, arguments: arguments, environment: ProcessInfo.processInfo.environment))
    }

    /// The usage line of `--help`.
    static var usage: String {
        schema.command + " [--<setting> <value> ...]" + (schema.operands.map { " <\($0.name)> ..." } ?? "")
    }

    /// The discussion of `--help`: `text`, then every declared setting.
    static func discussion(_ text: String) -> String {
        text + "\n\n" + schema.helpText()
    }
}

extension ResolvedSettings {
    /// The gradient files or directories given as arguments; at least one.
    func gradientPaths() throws -> [String] {
        guard !operands.isEmpty else { throw JobError(.usage, "\(schema.command): give the gradient files or directories (see --help)") }
        return operands
    }

    /// The job's settings; the micro-batch count `--convention peft` divides by is
    /// `--micro-batches`, else the sum of the files' "micro_batches" metadata (data-parallel
    /// ranks' files add, as their gradients do).
    func jobSettings(readingMicroBatchesFrom files: () throws -> [SafeTensorsFile]) throws -> JobSettings {
        if let given: Int = try value("micro-batches") { return try jobSettings(microBatches: given) }
        guard try choice("convention", as: FactorConvention.self) == .peft else { return try jobSettings(microBatches: 1) }
        return try jobSettings(microBatches: Self.microBatches(in: try files()))
    }

    static func microBatches(in files: [SafeTensorsFile]) throws -> Int {
        // A sharded recording stores the job's total in every file (tensor-parallel ranks share
        // batches, so their own counts would add up to too many).
        let totals = Set(files.compactMap { $0.metadata["micro_batches_total"].flatMap { Int($0) } })
        if let total = totals.first, totals.count == 1, total > 0 { return total }
        var total = 0
        for file in files {
            guard let text = file.metadata["micro_batches"], let count = Int(text), count > 0 else {
                throw JobError(.usage, "\(file.path) has no \"micro_batches\" metadata; --convention peft needs the micro-batch count: give --micro-batches N")
            }
            total += count
        }
        return max(total, 1)
    }

    /// Whether `init` and `local` draw a progress bar (on a terminal, with text logs).
    var logsAsText: Bool { text("log-format")?.value.lowercased() != "json" }
}

/// The dtype of files `synth` writes and adapters `export` writes.
enum AdapterDType: String, ExpressibleByArgument, CaseIterable {
    case f32, bf16, f16
    var tensorDType: TensorDType {
        switch self {
        case .f32: .f32
        case .bf16: .bf16
        case .f16: .f16
        }
    }
}
