import Foundation

import LoRAGACore

/// Every setting of lora-ga-coord, lora-ga-worker and the `lora-ga` subcommands that compute
/// an adapter (`init`, `local`), declared once each. A setting several executables share is
/// one declaration here, so its name, default and help are the same everywhere.
public enum SettingsCatalog {
    /// How every executable reads its settings and logs.
    public static let logging: [Setting] = [
        Setting("config", .path, help: "JSON config file: an object whose keys are these settings' names (\"_comment\" keys are ignored, unknown keys are errors)."),
        Setting("log-level", .choice(["trace", "debug", "info", "notice", "warning", "error", "critical"]), default: "info", help: "Least severe log message written."),
        Setting("log-format", .choice(["text", "json"]), default: "text", help: "Log lines on stderr as text, or as one JSON object per line."),
    ]

    /// Settings every daemon has.
    public static let common: [Setting] = logging + [
        Setting("metrics-listen", .address, help: "Serve Prometheus metrics at http://HOST:PORT/metrics while running (port 0 picks a free one)."),
        Setting("metrics-file", .path, help: "Write the final metric values here at exit, in the node-exporter textfile format (written atomically)."),
        Setting("summary-file", .path, help: "Write a JSON summary (bytes, seconds, peak RSS, CPU) here at the end."),
        Setting("secret-file", .path, help: "File holding the job's shared secret (at least 16 bytes); workers prove they know it."),
    ]

    /// The LoRA-GA factors and the randomized SVD that finds them: `lora-ga init`, `lora-ga
    /// local` and lora-ga-coord (see ``ResolvedSettings/jobSettings(microBatches:)``).
    public static let factors: [Setting] = [
        Setting("rank", .int, default: "8", short: "r", help: "LoRA rank r; LoRA-GA uses the top 2r singular directions."),
        Setting("alpha", .double, help: "LoRA alpha (default 2r, as in the LoRA-GA paper's r = 8, alpha = 16)."),
        Setting("rslora", .flag, default: "false", help: "rsLoRA scaling alpha / √r instead of alpha / r."),
        Setting("direction", .choice(LoRAGADirection.allCases.map(\.rawValue)), default: "ArB2r", help: "Which singular directions go where: ArB2r (A = top r right vectors, B = next r left vectors) or A2rBr."),
        Setting("scale", .choice(["stable", "unit", "gd"]), default: "stable", help: "Factor scale: stable (out^¼ / √gamma), unit, or gd (1 / scaling)."),
        Setting("gamma", .double, help: "γ of the stable scale for lora-ga (default 16); of LoRA-One's 1/√(σ₁γ) for lora-one (default 128)."),
        Setting("method", .choice(LoRAMethod.allCases.map(\.rawValue)), default: "lora-ga", help: "lora-ga: A and B from the top 2r singular directions, the base must be offset by scaling·B·A (lora_ga.attach does it); lora-one: B·A = −G_r/(σ₁γ) from the top r, the base is used as is."),
        Setting("convention", .choice(FactorConvention.allCases.map(\.rawValue)), default: "reference", help: "lora-ga factor formulas: reference (the LoRA-GA code's) or peft (PEFT's init_lora_weights=\"lora_ga\": B = U·diag(S)·c from the gradient averaged over --micro-batches, A unscaled)."),
        Setting("micro-batches", .int, help: "Micro-batches summed into the gradient files, for --convention peft (default: the sum of the files' \"micro_batches\" metadata where the files are read here; 1 in lora-ga-coord, which reads none)."),
        Setting("fan-in-fan-out", .flag, default: "false", help: "The gradient tensors are stored [in, out] (GPT-2's Conv1D): factor their transpose and write an adapter with fan_in_fan_out = true."),
        Setting("mode", .choice(SVDMode.allCases.map(\.rawValue)), default: "power", help: "power: re-read the gradient in row blocks (distributed: workers keep their gradients and answer power-iteration rounds, sending (out+in)·k per round); dense: hold each layer's sum (memory out·in); sketch: one streamed pass folded into (out+in)·k sketches (less exact)."),
        Setting("oversampling", .int, help: "Oversampling p (dense, power): sketch width k = 2r + p (default r + min(r, 16): 2r up to r = 16, then r + 16)."),
        Setting("passes", .int, default: "\(SVDDefaults.passes)", help: "Applications of G or Gᵀ (dense, power), at least 2."),
        Setting("sketch-width", .int, help: "Sketch width k for --mode sketch (default 4r + 128); memory ≈ 4·(out+in)·(3k+1) bytes, and wider is closer to the optimum."),
        Setting("seed", .int, default: "\(SVDDefaults.seed)", help: "Seed of the random test matrices."),
    ]

    /// A job's output directory and adapter: `lora-ga init`, `lora-ga local` and lora-ga-coord.
    public static let out = Setting("out", .path, short: "o", help: "Output directory (required); a run on the same directory resumes after its last finished layer.")
    public static let restart = Setting("restart", .flag, default: "false", help: "Discard an existing job in OUT instead of resuming it.")
    public static let adapterDType = Setting("adapter-dtype", .choice(TensorDType.writableCases.map(\.argumentName)), default: "f32", help: "dtype of the adapter tensors.")

    /// The distributed job: `lora-ga local` and lora-ga-coord.
    public static let workers = Setting("workers", .int, help: "Number of workers in the job (required by lora-ga-coord; lora-ga local starts 2 when not told).")
    public static let window = Setting("window", .int, default: "2", help: "Layers open at once.")
    public static let payloadDType = Setting("payload-dtype", .choice(TensorDType.writableCases.map(\.argumentName)), default: "f32", help: "dtype shards travel in.")
    public static let compress = Setting("compress", .flag, default: "false", help: "zstd-compress byte-shuffled shards (helps on slow networks only).")

    /// Gradient files: `lora-ga init`, `lora-ga local` and lora-ga-coord (whose workers' blocks
    /// must together cover every layer).
    public static let allowUncovered = Setting("allow-uncovered", .flag, default: "false", help: "Count entries of a layer that no gradient file covers (blocks leaving a hole) as zeros instead of refusing the layer.")
    public static let target = Setting("target", .string, help: "Regular expression selecting layers by tensor name (default: every 2-D tensor).")
    static let gradientPaths = SettingsSchema.Operands("paths", help: "Gradient files, or directories holding *.safetensors (searched recursively).")

    public static let coordinator = SettingsSchema(command: "lora-ga-coord", settings: common + [
        Setting("listen", .address, default: "127.0.0.1:7070", help: "Address to listen on for workers (port 0 picks a free one)."),
        Setting("port-file", .path, help: "Write the bound port to this file once listening."),
        workers,
        out,
    ] + factors + [
        window,
        payloadDType,
        compress,
        adapterDType,
        Setting("gather-timeout", .double, default: "600", help: "Seconds to wait for all workers to join."),
        Setting("rejoin-timeout", .double, default: "120", help: "Seconds a worker that left may take to come back."),
        Setting("handshake-timeout", .double, default: "10", help: "Seconds a new connection may take to authenticate and announce before it is closed."),
        Setting("stall-warning", .double, default: "60", help: "Seconds a worker that owes a layer data may stay silent before a warning names it and what it owes."),
        restart,
        allowUncovered,
        Setting("insecure", .flag, default: "false", help: "Allow listening on a non-loopback address without a secret (trusted networks only)."),
        Setting("tls-cert", .path, help: "PEM certificate (chain) to serve TLS with; workers then need --tls-ca. Needs --tls-key."),
        Setting("tls-key", .path, help: "PEM private key of --tls-cert."),
        Setting("tls-client-ca", .path, help: "PEM CA certificate(s): require workers to present a client certificate it signed (mutual TLS)."),
    ])

    public static let worker = SettingsSchema(command: "lora-ga-worker", settings: common + [
        Setting("connect", .address, default: "127.0.0.1:7070", help: "Coordinator address."),
        Setting("grads", .paths, help: "Gradient file or directory (repeatable; directories are searched for *.safetensors; required)."),
        Setting("id", .string, help: "This worker's id, unique in the job (default: hostname-pid)."),
        Setting("connect-timeout", .double, default: "300", help: "Seconds to keep trying to reach the coordinator (first connect and reconnects); past it the worker exits 75."),
        Setting("rate-limit", .double, help: "Cap shard traffic at this many MB/s (default: no cap)."),
        Setting("tls-ca", .path, help: "PEM CA certificate(s) to verify a TLS coordinator with; without it the worker speaks plaintext."),
        Setting("tls-cert", .path, help: "PEM client certificate for mutual TLS (with --tls-key)."),
        Setting("tls-key", .path, help: "PEM private key of --tls-cert."),
        Setting("tls-server-name", .string, help: "Host name to verify the coordinator's certificate against (default: the host of --connect)."),
    ])

    /// `lora-ga init`: the factors computed in this process.
    public static let initCommand = SettingsSchema(command: "lora-ga init", settings: logging + [out] + factors + [
        adapterDType,
        restart,
        target,
        Setting("estimate-fidelity", .flag, default: "false", help: "Power mode: read each layer once more to report a fidelity estimate (dense mode always does; `lora-ga verify` measures it exactly)."),
        allowUncovered,
    ], operands: gradientPaths)

    /// `lora-ga local`: a coordinator and workers on this machine; every coordinator setting
    /// it has is passed on as the same setting.
    public static let localCommand = SettingsSchema(command: "lora-ga local", settings: logging + [workers, out] + factors + [
        window,
        payloadDType,
        compress,
        adapterDType,
        restart,
        allowUncovered,
    ], operands: gradientPaths)

    /// `lora-ga verify`: an adapter measured against the gradient files it came from.
    public static let verifyCommand = SettingsSchema(command: "lora-ga verify", settings: logging + [
        Setting("adapter", .path, help: "Adapter directory (holding adapter_model.safetensors; required)."),
        Setting("threshold", .double, default: "1.01", help: "Largest acceptable ratio; a worse layer makes verify exit 1."),
        target,
        allowUncovered,
    ], operands: SettingsSchema.Operands("paths", help: "The gradient files or directories the adapter was computed from."))

    /// Every schema, for the checks that span executables.
    public static var all: [SettingsSchema] { [coordinator, worker, initCommand, localCommand, verifyCommand] }

    /// LORA_GA_* variables of lora-ga's scripts and tests, not settings of an executable.
    public static let reservedEnvironmentNames = ["LORA_GA_BIN", "LORA_GA_SCRATCH", "LORA_GA_VENV"]

    /// Every LORA_GA_* name some lora-ga executable or script reads.
    public static var allEnvironmentNames: [String] {
        Array(Set(all.flatMap(\.settings).map(\.environmentName) + reservedEnvironmentNames)).sorted()
    }
}

/// A daemon's settings resolved: flags > environment > config file > declared defaults.
public struct ResolvedSettings: Sendable {
    public let schema: SettingsSchema
    public let flags: [String: [String]]
    public let layers: LayeredSettings
    /// The bare arguments, for a schema that declares ``SettingsSchema/Operands``.
    public let operands: [String]

    /// From the command line and the process environment (the config file named by
    /// `--config` or LORA_GA_CONFIG). Every layer is checked against `schema`.
    public init(schema: SettingsSchema, arguments: [String], environment: [String: String]) throws {
        let (flags, operands) = try schema.parseWithOperands(arguments: arguments)
        let configFile = flags["config"]?.last ?? environment[LayeredSettings.environmentName("config")]
        try self.init(schema: schema, flags: flags, layers: LayeredSettings(configFile: configFile, environment: environment), operands: operands)
    }

    public init(schema: SettingsSchema, flags: [String: [String]], layers: LayeredSettings, operands: [String] = []) throws {
        for (name, values) in flags {
            guard let setting = schema.setting(name) else {
                throw JobError(.usage, "\(schema.command): unknown setting '\(name)'\(SettingsSchema.suggestion(for: name, among: schema.names, prefix: "--"))")
            }
            for value in values { try setting.check(value, source: "--\(name)") }
        }
        try schema.validate(layers)
        self.schema = schema
        self.flags = flags
        self.layers = layers
        self.operands = operands
    }

    /// The text of `name` and where it came from ("--rank", "LORA_GA_RANK", the file, or "default").
    public func text(_ name: String) -> (value: String, source: String)? {
        guard let setting = schema.setting(name) else { preconditionFailure("\(schema.command) declares no setting '\(name)'") }
        if let given = layers.text(name, flag: flags[name]?.last) { return given }
        return setting.defaultValue.map { ($0, "default of --\(name)") }
    }

    /// The value of `name` as `T`, or nil when no layer sets it and it has no default.
    public func value<T: LosslessStringConvertible>(_ name: String, as type: T.Type = T.self) throws -> T? {
        guard let (text, source) = text(name) else { return nil }
        let normalized = schema.setting(name)?.kind == .flag ? text.lowercased() : text
        guard let value = T(normalized) else { throw JobError(.usage, "\(source): '\(text)' is not a valid \(name)") }
        return value
    }

    /// The value of `name`, failing with a message that says how to set it.
    public func required<T: LosslessStringConvertible>(_ name: String, as type: T.Type = T.self) throws -> T {
        guard let value: T = try value(name) else { throw JobError(.usage, LayeredSettings.missing(name)) }
        return value
    }

    public func flag(_ name: String) throws -> Bool { try value(name) ?? false }

    /// A repeatable setting: every flag given, else the environment's or the file's comma-separated list.
    public func list(_ name: String) -> [String] {
        if let given = flags[name], !given.isEmpty { return given }
        guard let (text, _) = layers.text(name, flag: nil) else { return [] }
        return text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    public var logLevel: String { text("log-level")?.value ?? "info" }
}
