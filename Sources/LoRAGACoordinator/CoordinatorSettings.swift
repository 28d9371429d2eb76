import LoRAGACore
import LoRAGADaemon
import NIOSSL
import LoRAGAFormats
import LoRAGAWire

/// The coordinator's settings resolved from flags, environment and config file, as
/// declared in ``SettingsCatalog/coordinator``.
public struct CoordinatorSettings: Sendable {
    public var host: String
    public var port: Int
    /// Write the bound port here once listening (lets `--listen HOST:0` be used by scripts).
    public var portFile: String?
    public var options: CoordinatorOptions
    /// Set when the coordinator serves TLS (`--tls-cert`, `--tls-key`).
    public var tls: NIOSSLContext?

    /// Every key the coordinator reads, as flag names (also the config file's keys).
    public static var keys: [String] { SettingsCatalog.coordinator.names }

    /// - Parameter flags: values given on the command line, keyed like `keys`.
    public init(flags: [String: String], layers: LayeredSettings) throws {
        try self.init(ResolvedSettings(schema: SettingsCatalog.coordinator, flags: flags.mapValues { [$0] }, layers: layers))
    }

    public init(_ settings: ResolvedSettings) throws {
        precondition(settings.schema.command == SettingsCatalog.coordinator.command, "not the coordinator's settings")
        let (host, port) = try LayeredSettings.hostAndPort(try settings.required("listen"), setting: "listen")
        let rank: Int = try settings.required("rank")
        let method: LoRAMethod = try settings.required("method")
        let gamma: Double = try settings.value("gamma") ?? method.defaultGamma
        let scale: LoRAGAScale
        switch try settings.required("scale", as: String.self) {
        case "unit": scale = .unit
        case "gd": scale = .gd
        default: scale = .stable(gamma: gamma)
        }
        let lora = LoRAConfiguration(
            rank: rank, alpha: try settings.value("alpha") ?? Double(2 * rank), useRSLoRA: try settings.flag("rslora"),
            direction: try settings.required("direction"), scale: scale, method: method,
            convention: try settings.required("convention"), microBatches: try settings.required("micro-batches"),
            fanInFanOut: try settings.flag("fan-in-fan-out"))
        let job = JobSettings(
            lora: lora, mode: try settings.required("mode"),
            oversampling: try settings.value("oversampling"), passes: try settings.value("passes"), sketchWidth: try settings.value("sketch-width"),
            seed: try settings.required("seed"))
        let workers: Int = try settings.required("workers")
        let out: String = try settings.required("out")
        var options = CoordinatorOptions(settings: job, expectedWorkers: workers, outputDirectory: out)
        options.window = try settings.required("window")
        options.payloadDType = try CoordinatorSettings.writableDType(settings, "payload-dtype")
        options.adapterDType = try CoordinatorSettings.writableDType(settings, "adapter-dtype")
        options.compressShards = try settings.flag("compress")
        options.gatherTimeout = .seconds(try settings.required("gather-timeout", as: Double.self))
        options.rejoinTimeout = .seconds(try settings.required("rejoin-timeout", as: Double.self))
        options.restart = try settings.flag("restart")
        options.handshakeTimeout = .seconds(try settings.required("handshake-timeout", as: Double.self))
        options.stallWarning = .seconds(try settings.required("stall-warning", as: Double.self))
        if let secretFile: String = try settings.value("secret-file") {
            do { options.secret = try JobSecret(file: secretFile) } catch { throw JobError(.usage, "--secret-file \(secretFile): \(error)") }
        } else if !(try settings.flag("insecure")) && !CoordinatorSettings.isLoopback(host) {
            throw JobError(.usage, "refusing to listen on \(host) without a shared secret: anyone who can reach it could add gradients. Give --secret-file (or LORA_GA_SECRET_FILE), or --insecure on a network you trust")
        }
        let problems = job.validationErrors() + (workers < 1 ? ["workers must be at least 1"] : []) + (options.window < 1 ? ["window must be at least 1"] : [])
        guard problems.isEmpty else { throw JobError(.usage, problems.joined(separator: "; ")) }
        let certificate: String? = try settings.value("tls-cert"), key: String? = try settings.value("tls-key")
        let clientCA: String? = try settings.value("tls-client-ca")
        switch (certificate, key) {
        case let (certificate?, key?): tls = try DaemonTLS.serverContext(certificate: certificate, key: key, clientCA: clientCA)
        case (nil, nil):
            guard clientCA == nil else { throw JobError(.usage, "--tls-client-ca needs --tls-cert and --tls-key") }
            tls = nil
        default: throw JobError(.usage, "--tls-cert and --tls-key go together")
        }
        self.host = host
        self.port = port
        self.portFile = try settings.value("port-file")
        self.options = options
    }

    /// 127.0.0.0/8, ::1 and localhost: reachable from this machine only.
    public static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host.hasPrefix("127.")
    }

    /// A dtype setting that `Float` data is written as (F64 is read from files only).
    static func writableDType(_ settings: ResolvedSettings, _ name: String) throws -> TensorDType {
        let dtype: TensorDType = try settings.required(name)
        guard dtype.isWritableFromFloat else {
            throw JobError(.usage, "\(name) '\(dtype.argumentName)' is not one of \(TensorDType.writableCases.map(\.argumentName).joined(separator: ", "))")
        }
        return dtype
    }
}
