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
        // lora-ga-coord reads no gradient files, so it cannot take the count from their metadata.
        let job = try settings.jobSettings(microBatches: try settings.value("micro-batches") ?? 1)
        let workers: Int = try settings.required("workers")
        let out: String = try settings.required("out")
        var options = CoordinatorOptions(settings: job, expectedWorkers: workers, outputDirectory: out)
        options.window = try settings.required("window")
        options.payloadDType = try settings.dtype("payload-dtype")
        options.adapterDType = try settings.dtype("adapter-dtype")
        options.compressShards = try settings.flag("compress")
        options.gatherTimeout = .seconds(try settings.required("gather-timeout", as: Double.self))
        options.rejoinTimeout = .seconds(try settings.required("rejoin-timeout", as: Double.self))
        options.restart = try settings.flag("restart")
        options.allowUncovered = try settings.flag("allow-uncovered")
        options.handshakeTimeout = .seconds(try settings.required("handshake-timeout", as: Double.self))
        options.stallWarning = .seconds(try settings.required("stall-warning", as: Double.self))
        if let secretFile: String = try settings.value("secret-file") {
            do { options.secret = try JobSecret(file: secretFile) } catch { throw JobError(.usage, "--secret-file \(secretFile): \(error)") }
        } else if !(try settings.flag("insecure")) && !CoordinatorSettings.isLoopback(host) {
            throw JobError(.usage, "refusing to listen on \(host) without a shared secret: anyone who can reach it could add gradients. Give --secret-file (or LORA_GA_SECRET_FILE), or --insecure on a network you trust")
        }
        let problems = (workers < 1 ? ["--workers must be at least 1"] : []) + (options.window < 1 ? ["--window must be at least 1"] : [])
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
}
