import Foundation

import LoRAGACore

/// Every setting of lora-ga-coord and lora-ga-worker, declared once each.
public enum SettingsCatalog {
    /// Settings every daemon has.
    public static let common: [Setting] = [
        Setting("config", .path, help: "JSON config file: an object whose keys are these settings' names (\"_comment\" keys are ignored, unknown keys are errors)."),
        Setting("log-level", .choice(["trace", "debug", "info", "notice", "warning", "error", "critical"]), default: "info", help: "Least severe log message written."),
        Setting("log-format", .choice(["text", "json"]), default: "text", help: "Log lines on stderr as text, or as one JSON object per line."),
        Setting("metrics-listen", .address, help: "Serve Prometheus metrics at http://HOST:PORT/metrics while running (port 0 picks a free one)."),
        Setting("metrics-file", .path, help: "Write the final metric values here at exit, in the node-exporter textfile format (written atomically)."),
        Setting("summary-file", .path, help: "Write a JSON summary (bytes, seconds, peak RSS, CPU) here at the end."),
        Setting("secret-file", .path, help: "File holding the job's shared secret (at least 16 bytes); workers prove they know it."),
    ]

    public static let coordinator = SettingsSchema(command: "lora-ga-coord", settings: common + [
        Setting("listen", .address, default: "127.0.0.1:7070", help: "Address to listen on for workers (port 0 picks a free one)."),
        Setting("port-file", .path, help: "Write the bound port to this file once listening."),
        Setting("workers", .int, help: "Number of workers in the job (required)."),
        Setting("out", .path, short: "o", help: "Output directory (required); a restart on the same directory resumes."),
        Setting("rank", .int, default: "8", short: "r", help: "LoRA rank r."),
        Setting("alpha", .double, help: "LoRA alpha (default 2r)."),
        Setting("rslora", .flag, default: "false", help: "rsLoRA scaling alpha / √r."),
        Setting("direction", .choice(LoRAGADirection.allCases.map(\.rawValue)), default: "ArB2r", help: "Which singular directions go to A and B."),
        Setting("scale", .choice(["stable", "unit", "gd"]), default: "stable", help: "Factor scale."),
        Setting("gamma", .double, help: "γ of the stable scale (default 16; 128 with --method lora-one)."),
        Setting("method", .choice(LoRAMethod.allCases.map(\.rawValue)), default: "lora-ga", help: "lora-ga: A, B from the top 2r singular directions, the base must be offset; lora-one: B·A = −G_r/(σ₁γ), no offset."),
        Setting("convention", .choice(FactorConvention.allCases.map(\.rawValue)), default: "reference", help: "reference: the LoRA-GA reference scaling; peft: PEFT's LoRA-GA initialization (gradient averaged over --micro-batches)."),
        Setting("micro-batches", .int, default: "1", help: "Micro-batches the gradients sum over (--convention peft divides by it)."),
        Setting("fan-in-fan-out", .flag, default: "false", help: "Gradients are stored [in, out] (GPT-2 Conv1D): factors for PEFT's fan_in_fan_out."),
        Setting("mode", .choice(SVDMode.allCases.map(\.rawValue)), default: "power", help: "power: workers keep their gradients and answer power-iteration rounds, sending (out+in)·k per round; dense: workers send each layer, summed here (memory out·in); sketch: shards folded into (out+in)·k sketches in one pass."),
        Setting("oversampling", .int, help: "Oversampling p (dense, power; default r + min(r, 16))."),
        Setting("passes", .int, default: "\(SVDDefaults.passes)", help: "Passes over G (dense, power)."),
        Setting("sketch-width", .int, help: "Sketch width k (sketch; default 4r + 128)."),
        Setting("seed", .int, default: "\(SVDDefaults.seed)", help: "Seed of the test matrices."),
        Setting("window", .int, default: "2", help: "Layers open at once."),
        Setting("payload-dtype", .choice(["f32", "bf16", "f16"]), default: "f32", help: "dtype shards travel in."),
        Setting("compress", .flag, default: "false", help: "zstd-compress byte-shuffled shards (helps on slow networks only)."),
        Setting("adapter-dtype", .choice(["f32", "bf16", "f16"]), default: "f32", help: "dtype of the adapter tensors."),
        Setting("gather-timeout", .double, default: "600", help: "Seconds to wait for all workers to join."),
        Setting("rejoin-timeout", .double, default: "120", help: "Seconds a worker that left may take to come back."),
        Setting("handshake-timeout", .double, default: "10", help: "Seconds a new connection may take to authenticate and announce before it is closed."),
        Setting("stall-warning", .double, default: "60", help: "Seconds a worker that owes a layer data may stay silent before a warning names it and what it owes."),
        Setting("restart", .flag, default: "false", help: "Discard an existing job in OUT instead of resuming it."),
        Setting("allow-uncovered", .flag, default: "false", help: "Treat entries of a layer that no worker's blocks cover as zeros, instead of failing the job naming the layer and the uncovered range."),
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

    /// LORA_GA_* variables of lora-ga's scripts and tests, not settings of an executable.
    public static let reservedEnvironmentNames = ["LORA_GA_BIN", "LORA_GA_SCRATCH", "LORA_GA_VENV"]

    /// Every LORA_GA_* name some lora-ga executable or script reads.
    public static var allEnvironmentNames: [String] {
        Array(Set((coordinator.settings + worker.settings).map(\.environmentName) + reservedEnvironmentNames)).sorted()
    }
}

/// A daemon's settings resolved: flags > environment > config file > declared defaults.
public struct ResolvedSettings: Sendable {
    public let schema: SettingsSchema
    public let flags: [String: [String]]
    public let layers: LayeredSettings

    /// From the command line and the process environment (the config file named by
    /// `--config` or LORA_GA_CONFIG). Every layer is checked against `schema`.
    public init(schema: SettingsSchema, arguments: [String], environment: [String: String]) throws {
        let flags = try schema.parse(arguments: arguments)
        let configFile = flags["config"]?.last ?? environment[LayeredSettings.environmentName("config")]
        try self.init(schema: schema, flags: flags, layers: LayeredSettings(configFile: configFile, environment: environment))
    }

    public init(schema: SettingsSchema, flags: [String: [String]], layers: LayeredSettings) throws {
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
