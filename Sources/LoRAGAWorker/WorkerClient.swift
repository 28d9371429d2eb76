import Foundation
import Logging
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import LoRAGADaemon

/// How a worker joins a job.
public struct WorkerOptions: Sendable {
    public var host: String
    public var port: Int
    public var id: String
    /// Gradient files or directories; same-named tensors are summed locally before sending.
    public var gradientPaths: [String]
    /// Keep trying to reach the coordinator this long (first connect and reconnects).
    public var connectTimeout: Duration = .seconds(300)
    public var maxFrameLength = WireProtocol.defaultMaxFrameLength
    /// Shard payload size to aim for.
    public var shardBytes = 4 << 20
    /// Shard payload size in dense jobs when the rows go from the gradient file by `sendfile`
    /// (``GradientReader/sendsRowsFromFile(of:as:compress:)``): no buffer holds them on either
    /// side (the coordinator adds a shard slice by slice as it arrives; the worker maps 4 MB of
    /// it at a time to hash it), and fewer, larger frames ingest faster. Dense only: a sketch
    /// coordinator holds each shard whole.
    public var fileShardBytes = 32 << 20
    /// The job's shared secret, when the coordinator requires one.
    public var secret: JobSecret?
    /// Cap on shard bandwidth in bytes per second (nil: as fast as TCP goes), to spare a
    /// network the training job shares.
    public var maxBytesPerSecond: Double?
    /// Connect with TLS using this context (built from `--tls-ca`, and `--tls-cert`/`--tls-key`
    /// for mutual TLS); nil: plaintext.
    public var tls: NIOSSLContext?
    /// The name the coordinator's certificate must carry (default: `host`; an IP address is
    /// checked against the certificate's IP entries).
    public var tlsServerName: String?
    /// Prometheus metrics: bytes and rows sent, reconnects, memory.
    public var metrics = WorkerMetrics()

    public init(host: String, port: Int, id: String, gradientPaths: [String]) {
        self.host = host
        self.port = port
        self.id = id
        self.gradientPaths = gradientPaths
    }
}

public struct WorkerSummary: Sendable {
    public var layersSent: Int
    public var powerReplies: Int
    /// Payload bytes sent (shards and power replies), over every connection.
    public var bytesSent: Int
    public var connections: Int
    public var adapterPath: String
    /// Size of this worker's gradient files.
    public var inputBytes: Int
}

/// Why a worker stopped without the job finishing.
public struct WorkerError: ClassifiedError, CustomStringConvertible {
    public let message: String
    /// The coordinator refused this worker (bad id, shapes, secret…): retrying cannot help.
    public let isFinal: Bool
    /// Which kind of failure (and so which exit status) this is, decided where it is raised.
    public var kind: JobError.Kind = .other
    public var description: String { message }
}

extension WireErrorCode {
    /// The kind of failure a worker refused with this code has.
    var failureKind: JobError.Kind {
        switch self {
        case .badAuth: .authentication
        case .shapeMismatch, .layerMismatch, .badData: .badInput
        case .duplicateWorker, .badVersion: .usage
        case .internal, .jobFailed: .other
        }
    }
}

/// A worker: reads its gradient files and serves the coordinator's requests — stream a
/// layer's row blocks (dense, sketch) or multiply its gradient by a matrix (power) — until
/// the job is done. Reconnects with backoff when the connection drops; everything it sends
/// for a layer counts only after its commit, so resending is always safe.
public struct WorkerClient: Sendable {
    /// Largest shard in sketch mode, where shards are sized for the coordinator's products.
    static let sketchShardBytes = 16 << 20

    public let options: WorkerOptions
    public var logger: Logger

    public init(options: WorkerOptions, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    public func run() async throws -> WorkerSummary {
        BLAS.configureThreads()
        let gradients: GradientReader
        do {
            gradients = try GradientReader(paths: options.gradientPaths)
        } catch {
            // The coordinator would otherwise wait out its whole gather timeout for this worker.
            let message = "worker '\(options.id)': \(error)"
            await report(message)
            throw WorkerError(message: message, isFinal: true, kind: .badInput)
        }
        gradients.logger = logger
        logger.info("worker '\(options.id)': \(gradients.files.files.count) gradient files, \(gradients.files.layers.count) layers")
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        defer { pool.shutdownGracefully { _ in } }
        var summary = WorkerSummary(layersSent: 0, powerReplies: 0, bytesSent: 0, connections: 0, adapterPath: "", inputBytes: gradients.inputBytes)
        let sessionNonce = UInt64.random(in: 0...UInt64.max)
        var deadline = ContinuousClock.now + options.connectTimeout
        var delay = Duration.milliseconds(100)
        while true {
            // A termination signal cancels this task: stop, never retry.
            try Task.checkCancellation()
            let channel: NIOAsyncChannel<WireMessage, WireMessage>
            do {
                channel = try await connect()
            } catch {
                if DaemonTLS.isTLSError(error) { throw tlsFailure(error) }
                guard ContinuousClock.now < deadline else {
                    // Resumable: the coordinator may come back (a restart resumes the job).
                    throw WorkerError(message: "could not reach the coordinator at \(options.host):\(options.port) within \(options.connectTimeout): \(error)",
                                      isFinal: true, kind: .interrupted)
                }
                logger.info("coordinator at \(options.host):\(options.port) not reachable (\(error)); retrying in \(delay)")
                try await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(5))
                continue
            }
            summary.connections += 1
            if summary.connections > 1 { options.metrics.reconnected() }
            delay = .milliseconds(100)
            do {
                if let path = try await serve(channel, gradients: gradients, pool: pool, sessionNonce: sessionNonce, summary: &summary) {
                    summary.adapterPath = path
                    return summary
                }
                logger.warning("connection to the coordinator lost; reconnecting")
            } catch let error as WorkerError where error.isFinal {
                throw error
            } catch where Task.isCancelled {
                throw CancellationError()
            } catch let error where DaemonTLS.isTLSError(error) {
                throw tlsFailure(error)
            } catch {
                logger.warning("connection to the coordinator failed (\(error)); reconnecting")
            }
            deadline = ContinuousClock.now + options.connectTimeout
        }
    }

    /// Tells the coordinator (after a normal handshake) why this worker cannot take part, so
    /// the job fails at once with the reason. Best effort: a few seconds, then give up.
    private func report(_ message: String) async {
        let attempt = Task {
            let channel = try await connect()
            try await channel.executeThenClose { inbound, outbound in
                var messages = inbound.makeAsyncIterator()
                guard case .challenge(let challenge)? = try await messages.next() else { return }
                let nonce = UInt64.random(in: 0...UInt64.max)
                let proof = options.secret?.proof(challenge: challenge.nonce, workerID: options.id, sessionNonce: nonce) ?? .zero
                try await outbound.write(.hello(Hello(protocolVersion: WireProtocol.version, workerID: options.id, sessionNonce: nonce, authProof: proof)))
                // The coordinator accepts more than a Hello only once it has answered it.
                guard case .jobSpec? = try await messages.next() else { return }
                try await outbound.write(.error(ErrorMessage(code: .badData, message: message)))
                outbound.finish()
                while try await messages.next() != nil {}
            }
        }
        let timeout = Task {
            try? await Task.sleep(for: .seconds(5))
            attempt.cancel()
        }
        _ = try? await attempt.value
        timeout.cancel()
    }

    /// A TLS handshake that failed: a plaintext coordinator, or a certificate the CA did not
    /// sign. Retrying cannot help; the configuration must change.
    private func tlsFailure(_ error: Error) -> WorkerError {
        WorkerError(message: "TLS with the coordinator at \(options.host):\(options.port) failed (\(error)): does it serve TLS (--tls-cert/--tls-key), signed by the CA in --tls-ca? A coordinator without --tls-cert speaks plaintext: then drop --tls-ca",
                    isFinal: true, kind: .usage)
    }

    private func connect() async throws -> NIOAsyncChannel<WireMessage, WireMessage> {
        let maxFrameLength = options.maxFrameLength
        let tls = options.tls
        let serverName = options.tlsServerName ?? (Self.isIPAddress(options.host) ? nil : options.host)
        return try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .connectTimeout(.seconds(5))
            .connect(host: options.host, port: options.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: tls, serverHostname: serverName))
                    }
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(maxFrameLength: maxFrameLength)))
                    try channel.pipeline.syncOperations.addHandler(FrameWriter(maxFrameLength: maxFrameLength))
                    return try NIOAsyncChannel<WireMessage, WireMessage>(
                        wrappingChannelSynchronously: channel,
                        configuration: .init(isOutboundHalfClosureEnabled: true))
                }
            }
    }

    static func isIPAddress(_ host: String) -> Bool {
        (try? SocketAddress(ipAddress: host, port: 0)) != nil
    }

    /// One connection's conversation. Returns the adapter path when the job is done, nil if
    /// the connection ended early (reconnect), throws a final `WorkerError` when refused.
    private func serve(_ channel: NIOAsyncChannel<WireMessage, WireMessage>, gradients: GradientReader, pool: NIOThreadPool,
                       sessionNonce: UInt64, summary: inout WorkerSummary) async throws -> String? {
        try await channel.executeThenClose { inbound, outbound in
            var messages = inbound.makeAsyncIterator()
            let challenge: Challenge
            switch try await messages.next() {
            case .challenge(let received): challenge = received
            case nil: return nil   // closed before greeting us (a coordinator going down): try again
            case .error(let error)?:
                // Refused before the handshake (e.g. a TLS coordinator answering a plaintext worker).
                throw WorkerError(message: "the coordinator at \(options.host):\(options.port) refused the connection: \(error.message)", isFinal: true, kind: error.code.failureKind)
            case let other?:
                throw WorkerError(message: "the peer at \(options.host):\(options.port) is not a lora-ga coordinator (it opened with \(other.type))", isFinal: true)
            }
            let proof = options.secret?.proof(challenge: challenge.nonce, workerID: options.id, sessionNonce: sessionNonce) ?? .zero
            try await outbound.write(.hello(Hello(protocolVersion: WireProtocol.version, workerID: options.id, sessionNonce: sessionNonce, authProof: proof)))
            let spec: JobSpec
            switch try await messages.next() {
            case .jobSpec(let received): spec = received
            case .error(let error): throw WorkerError(message: "the coordinator refused worker '\(options.id)': \(error.message)", isFinal: true, kind: error.code.failureKind)
            case nil: return nil
            case let other?: throw WorkerError(message: "expected JobSpec, got \(other.type)", isFinal: true)
            }
            logger.info("joined job: mode \(spec.mode), rank \(spec.rank), \(spec.skipLayers.count) layers already finished")
            try await outbound.write(.announce(Announce(layers: gradients.announcement)))
            // The coordinator names each layer in LayerBegin; power requests refer to it by index.
            var layerByIndex: [UInt32: GradientLayer] = [:]
            do {
                return try await serveRequests(&messages, outbound: outbound, spec: spec, gradients: gradients, pool: pool, layers: &layerByIndex, summary: &summary)
            } catch let error where error is GradientError || error is SafeTensorsError {
                // Bad data in this worker's files: no correct adapter can come of the job. Say so, and stop.
                let message = "worker '\(options.id)': \(error)"
                try? await outbound.write(.error(ErrorMessage(code: .badData, message: message)))
                throw WorkerError(message: message, isFinal: true, kind: .badInput)
            }
        }
    }

    private func serveRequests(
        _ messages: inout NIOAsyncChannelInboundStream<WireMessage>.AsyncIterator, outbound: NIOAsyncChannelOutboundWriter<WireMessage>,
        spec: JobSpec, gradients: GradientReader, pool: NIOThreadPool, layers layerByIndex: inout [UInt32: GradientLayer], summary: inout WorkerSummary
    ) async throws -> String? {
        while let message = try await messages.next() {
            switch message {
            case .layerBegin(let begin):
                guard let layer = gradients.files.layers.first(where: { $0.name == begin.name }) else {
                    throw WorkerError(message: "the coordinator asked for layer '\(begin.name)', which this worker's files do not hold", isFinal: true)
                }
                layerByIndex[begin.layerIndex] = layer
                if spec.mode != .power {
                    let bytes = try await sendLayer(begin, layer: layer, spec: spec, gradients: gradients, pool: pool, outbound: outbound)
                    summary.bytesSent += bytes
                    options.metrics.sent(bytes: bytes, rows: layer.rows)
                    summary.layersSent += 1
                    gradients.release(layer)   // streamed once; a restarted layer gets a new reader
                }
            case .powerRequest(let request):
                guard let layer = layerByIndex[request.layerIndex] else {
                    throw WorkerError(message: "power request for layer \(request.layerIndex) before its LayerBegin", isFinal: true)
                }
                let reply = try await pool.runIfActive { try gradients.answer(request, layer: layer) }
                try await outbound.write(.powerReply(reply))
                summary.bytesSent += reply.payload.readableBytes
                summary.powerReplies += 1
                options.metrics.sent(bytes: reply.payload.readableBytes, rows: layer.rows)
            case .layerDone(let done):
                if let layer = layerByIndex.removeValue(forKey: done.layerIndex) { gradients.release(layer) }
            case .jobDone(let done):
                logger.info("job done: adapter at \(done.adapterPath) (\(done.layers) layers)")
                outbound.finish()
                return done.adapterPath
            case .error(let error):
                throw WorkerError(message: "coordinator: \(error.message)", isFinal: error.code != .badData, kind: error.code.failureKind)
            case .goodbye:
                return nil
            case .challenge, .jobSpec, .hello, .announce, .shard, .layerCommit, .powerReply:
                throw WorkerError(message: "unexpected \(message.type) from the coordinator", isFinal: true)
            }
        }
        return nil
    }

    /// Rows per shard: `shardBytes` of payload, except in sketch mode, where the coordinator
    /// folds each shard into its sketch as one row block multiplied by test matrices of k + s
    /// columns that BLAS packs anew per block, so a few-row block wastes the packing. There
    /// shards are sized for those products, up to ``sketchShardBytes``, which bounds the memory
    /// a shard costs on both sides.
    static func rowsPerShard(rows: Int, cols: Int, payloadBytes: Int, spec: JobSpec, shardBytes: Int) -> Int {
        let rowBytes = Swift.max(1, cols * payloadBytes)
        let byBytes = Swift.max(1, Swift.min(rows, shardBytes / rowBytes))
        guard spec.mode == .sketch else { return byBytes }
        let blockRows = RowBlock.rowsPerProductBlock(cols: cols, productWidth: SingleViewSketch.blockProductWidth(width: Int(spec.sketchWidth)), minimumRows: SingleViewSketch.minimumBlockRows)
        return Swift.max(byBytes, Swift.min(rows, blockRows, sketchShardBytes / rowBytes))
    }

    /// Streams one layer as shards, reading the next shard while the current one is written.
    private func sendLayer(_ begin: LayerBegin, layer: GradientLayer, spec: JobSpec, gradients: GradientReader, pool: NIOThreadPool,
                           outbound: NIOAsyncChannelOutboundWriter<WireMessage>) async throws -> Int {
        let dtype = spec.payloadDType
        let compress = spec.compression == .zstdShuffled
        let fromFile = spec.mode == .dense && gradients.sendsRowsFromFile(of: layer, as: dtype, compress: compress)
        let rowsPerShard = Self.rowsPerShard(rows: layer.rows, cols: layer.cols, payloadBytes: dtype.byteSize, spec: spec,
                                             shardBytes: fromFile ? Swift.min(options.fileShardBytes, options.maxFrameLength / 2) : options.shardBytes)
        let ranges = stride(from: 0, to: layer.rows, by: rowsPerShard).map { $0..<Swift.min($0 + rowsPerShard, layer.rows) }
        func read(_ range: Range<Int>) -> Task<EncodedShard, Error> {
            Task { try await pool.runIfActive { try gradients.encode(layer, rows: range, as: dtype, compress: compress) } }
        }
        var checksum = ShardChecksum()   // of the shard checksums: the commit's
        var sent = 0
        let started = ContinuousClock.now
        var next = read(ranges[0])
        for (position, range) in ranges.enumerated() {
            let shard = try await next.value
            if position + 1 < ranges.count { next = read(ranges[position + 1]) }
            checksum.addShard(shard.checksum)
            let message: Shard
            if let file = shard.file {
                message = Shard(layerIndex: begin.layerIndex, rowStart: UInt64(range.lowerBound), rowCount: UInt32(range.count), cols: UInt64(layer.cols),
                                dtype: spec.payloadDType, payloadFile: file, checksum: shard.checksum, attempt: begin.attempt)
            } else {
                message = Shard(
                    layerIndex: begin.layerIndex, rowStart: UInt64(range.lowerBound), rowCount: UInt32(range.count), cols: UInt64(layer.cols),
                    dtype: spec.payloadDType, compression: shard.compressed == nil ? .uncompressed : .zstdShuffled,
                    uncompressedBytes: UInt64(shard.uncompressed.readableBytes), payload: shard.compressed ?? shard.uncompressed,
                    checksum: shard.checksum, attempt: begin.attempt)
            }
            try await outbound.write(.shard(message))
            sent += message.payloadBytes
            if let limit = options.maxBytesPerSecond, limit > 0 {
                // Pace to the cap: sleep until the bytes sent so far are due.
                let due = started + .seconds(Double(sent) / limit)
                if due > .now { try await Task.sleep(until: due, clock: .continuous) }
            }
        }
        try await outbound.write(.layerCommit(LayerCommit(layerIndex: begin.layerIndex, shardCount: UInt32(ranges.count), rowCount: UInt64(layer.rows), checksum: checksum.value, attempt: begin.attempt)))
        logger.info("sent layer \(begin.layerIndex) '\(layer.name)' (\(layer.rows)×\(layer.cols), \(sent / 1_000_000) MB\(begin.attempt > 0 ? ", attempt \(begin.attempt)" : ""))")
        return sent
    }
}
