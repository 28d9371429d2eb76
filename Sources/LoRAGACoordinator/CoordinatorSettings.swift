import LoRAGACore
import LoRAGAFormats
import LoRAGAWire

extension SVDMode: LosslessStringConvertible {
    public init?(_ description: String) { self.init(rawValue: description) }
    public var description: String { rawValue }
}

extension LoRAGADirection: LosslessStringConvertible {
    public init?(_ description: String) { self.init(rawValue: description) }
    public var description: String { rawValue }
}

extension LoRAMethod: LosslessStringConvertible {
    public init?(_ description: String) { self.init(rawValue: description) }
    public var description: String { rawValue }
}

extension FactorConvention: LosslessStringConvertible {
    public init?(_ description: String) { self.init(rawValue: description) }
    public var description: String { rawValue }
}

/// The coordinator's settings resolved from flags, environment and config file.
public struct CoordinatorSettings: Sendable {
    public var host: String
    public var port: Int
    /// Write the bound port here once listening (lets `--listen HOST:0` be used by scripts).
    public var portFile: String?
    public var options: CoordinatorOptions

    /// Every key the coordinator reads, as flag names (also the config file's keys).
    public static let keys = [
        "listen", "workers", "out", "rank", "alpha", "rslora", "direction", "scale", "gamma", "method", "convention",
        "micro-batches", "fan-in-fan-out", "mode",
        "oversampling", "passes", "sketch-width", "seed", "window", "payload-dtype", "compress",
        "adapter-dtype", "gather-timeout", "rejoin-timeout", "restart", "port-file", "secret-file", "insecure",
    ]

    /// - Parameter flags: values given on the command line, keyed like `keys`.
    public init(flags: [String: String], layers settings: LayeredSettings) throws {
        let unknown = Set(flags.keys).subtracting(CoordinatorSettings.keys)
        precondition(unknown.isEmpty, "unknown coordinator settings \(unknown)")
        func get<T: LosslessStringConvertible>(_ key: String, _ fallback: T) throws -> T {
            try optional(key) ?? fallback
        }
        func optional<T: LosslessStringConvertible>(_ key: String) throws -> T? {
            guard let (text, source) = settings.text(key, flag: flags[key]) else { return nil }
            guard let value = T(text) else { throw JobError("\(source): '\(text)' is not a valid \(key)") }
            return value
        }
        let (host, port) = try LayeredSettings.hostAndPort(try get("listen", "127.0.0.1:7070"), setting: "listen")
        let rank: Int = try get("rank", 8)
        let scaleName: String = try get("scale", "stable")
        let method: LoRAMethod = try get("method", LoRAMethod.loraGA)
        let gamma: Double = try get("gamma", method.defaultGamma)
        let scale: LoRAGAScale
        switch scaleName {
        case "stable": scale = .stable(gamma: gamma)
        case "unit": scale = .unit
        case "gd": scale = .gd
        default: throw JobError("scale '\(scaleName)' is not one of stable, unit, gd")
        }
        let lora = LoRAConfiguration(
            rank: rank, alpha: try get("alpha", Double(2 * rank)), useRSLoRA: try get("rslora", false),
            direction: try get("direction", LoRAGADirection.ArB2r), scale: scale, method: method,
            convention: try get("convention", FactorConvention.reference), microBatches: try get("micro-batches", 1),
            fanInFanOut: try get("fan-in-fan-out", false))
        let job = JobSettings(
            lora: lora, mode: try get("mode", SVDMode.power),
            oversampling: try optional("oversampling"), passes: try optional("passes"), sketchWidth: try optional("sketch-width"),
            seed: try get("seed", SVDDefaults.seed))
        guard let workers: Int = try optional("workers") else { throw JobError(LayeredSettings.missing("workers")) }
        guard let out: String = try optional("out") else { throw JobError(LayeredSettings.missing("out")) }
        var options = CoordinatorOptions(settings: job, expectedWorkers: workers, outputDirectory: out)
        options.window = try get("window", 2)
        options.payloadDType = try CoordinatorSettings.dtype(try get("payload-dtype", "f32"), key: "payload-dtype")
        options.adapterDType = try CoordinatorSettings.dtype(try get("adapter-dtype", "f32"), key: "adapter-dtype")
        options.compressShards = try get("compress", false)
        options.gatherTimeout = .seconds(try get("gather-timeout", 600.0))
        options.rejoinTimeout = .seconds(try get("rejoin-timeout", 120.0))
        options.restart = try get("restart", false)
        if let secretFile: String = try optional("secret-file") {
            options.secret = try JobSecret(file: secretFile)
        } else if !(try get("insecure", false)) && !CoordinatorSettings.isLoopback(host) {
            throw JobError("refusing to listen on \(host) without a shared secret: anyone who can reach it could add gradients. Give --secret-file (or LORA_GA_SECRET_FILE), or --insecure on a network you trust")
        }
        let problems = job.validationErrors() + (workers < 1 ? ["workers must be at least 1"] : []) + (options.window < 1 ? ["window must be at least 1"] : [])
        guard problems.isEmpty else { throw JobError(problems.joined(separator: "; ")) }
        self.host = host
        self.port = port
        self.portFile = try optional("port-file")
        self.options = options
    }

    /// 127.0.0.0/8, ::1 and localhost: reachable from this machine only.
    public static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host.hasPrefix("127.")
    }

    static func dtype(_ name: String, key: String) throws -> TensorDType {
        switch name.lowercased() {
        case "f32": return .f32
        case "bf16": return .bf16
        case "f16": return .f16
        default: throw JobError("\(key) '\(name)' is not one of f32, bf16, f16")
        }
    }
}
