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

/// A worker: reads its gradient files and serves the coordinator's requests — stream a
/// layer's row blocks (dense, sketch) or multiply its gradient by a matrix (power) — until
/// the job is done. Everything it sends for a layer counts only after its commit, so
/// resending is always safe.
///
/// The executor of ``WorkerStateMachine``, which decides when to connect, retry or give up and
/// what each message calls for: this type owns the sockets, the files, the thread pool and the
/// clock, feeds the machine events and carries out its actions.
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
        let configuration = WorkerStateMachine.Configuration(workerID: options.id, coordinator: "\(options.host):\(options.port)",
                                                             connectTimeout: options.connectTimeout, sessionNonce: UInt64.random(in: 0...UInt64.max))
        var machine = WorkerStateMachine(configuration: configuration, layers: gradients.files.layers)
        let clock = ContinuousClock()
        var pending = machine.start(now: clock.now)
        // Between connections: every batch the machine returns here ends in one of these actions.
        while !pending.isEmpty {
            switch pending.removeFirst() {
            case .connect:
                pending = await connectAndServe(&machine, clock: clock, gradients: gradients, pool: pool, summary: &summary)
            case .retry(let delay, let reason):
                logger.info("\(reason); retrying in \(delay)")
                do {
                    try await Task.sleep(for: delay)
                    pending = await connectAndServe(&machine, clock: clock, gradients: gradients, pool: pool, summary: &summary)
                } catch {
                    pending = machine.cancelled()
                }
            case .reconnect(let reason):
                logger.warning("\(reason); reconnecting")
                pending = await connectAndServe(&machine, clock: clock, gradients: gradients, pool: pool, summary: &summary)
            case .finish(let done):
                summary.adapterPath = done.adapterPath
                return summary
            case .fail(let error):
                throw error
            case .stop:
                throw CancellationError()
            case .sendHello, .sendAnnounce, .streamLayer, .answerPower, .releaseLayer, .sendError, .closeConnection:
                assertionFailure("a connection's action outside a connection")
            }
        }
        throw WorkerError(message: "the worker stopped without a decision", isFinal: true)
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

    /// One connection: opens it, feeds the machine each message and carries out its actions.
    /// Returns the actions that follow the connection's end (reconnect, finish, fail, stop).
    private func connectAndServe(_ machine: inout WorkerStateMachine, clock: ContinuousClock, gradients: GradientReader, pool: NIOThreadPool,
                                 summary: inout WorkerSummary) async -> [WorkerStateMachine.Action] {
        // A termination signal cancels this task: stop, never retry.
        if Task.isCancelled { return machine.cancelled() }
        let channel: NIOAsyncChannel<WireMessage, WireMessage>
        do {
            channel = try await connect()
        } catch {
            return machine.connectFailed(.init("\(error)", isTLS: DaemonTLS.isTLSError(error)), now: clock.now)
        }
        summary.connections += 1
        if summary.connections > 1 { options.metrics.reconnected() }
        let initial = machine.connected()
        do {
            if let next = try await serve(channel, machine: &machine, initial: initial, gradients: gradients, pool: pool, summary: &summary) {
                return next
            }
            return machine.connectionClosed(now: clock.now)
        } catch where Task.isCancelled {
            return machine.cancelled()
        } catch {
            return machine.connectionClosed(now: clock.now, failure: .init("\(error)", isTLS: DaemonTLS.isTLSError(error)))
        }
    }

    /// The conversation on one open connection. Returns nil when the connection ended (either
    /// side closed it), else the actions that end the worker (finish, fail).
    private func serve(_ channel: NIOAsyncChannel<WireMessage, WireMessage>, machine: inout WorkerStateMachine, initial: [WorkerStateMachine.Action],
                       gradients: GradientReader, pool: NIOThreadPool, summary: inout WorkerSummary) async throws -> [WorkerStateMachine.Action]? {
        try await channel.executeThenClose { inbound, outbound in
            var messages = inbound.makeAsyncIterator()
            var pending = initial
            while true {
                while !pending.isEmpty {
                    let action = pending.removeFirst()
                    do {
                        switch try await perform(action, outbound: outbound, gradients: gradients, pool: pool, summary: &summary) {
                        case .continue: break
                        case .closed: return nil
                        case .ended: return [action]
                        }
                    } catch let error where error is GradientError || error is SafeTensorsError {
                        // Bad data in this worker's files: the machine says so to the coordinator, and stops.
                        pending = machine.filesFailed("worker '\(options.id)': \(error)")
                    }
                }
                guard let message = try await messages.next() else { return nil }
                pending = machine.received(message)
            }
        }
    }

    /// What a performed action means for its connection.
    private enum Outcome { case `continue`, closed, ended }

    private func perform(_ action: WorkerStateMachine.Action, outbound: NIOAsyncChannelOutboundWriter<WireMessage>, gradients: GradientReader,
                         pool: NIOThreadPool, summary: inout WorkerSummary) async throws -> Outcome {
        switch action {
        case .sendHello(let challenge, let sessionNonce):
            let proof = options.secret?.proof(challenge: challenge.nonce, workerID: options.id, sessionNonce: sessionNonce) ?? .zero
            try await outbound.write(.hello(Hello(protocolVersion: WireProtocol.version, workerID: options.id, sessionNonce: sessionNonce, authProof: proof)))
        case .sendAnnounce(let spec):
            logger.info("joined job: mode \(spec.mode), rank \(spec.rank), \(spec.skipLayers.count) layers already finished")
            try await outbound.write(.announce(Announce(layers: gradients.announcement)))
        case .streamLayer(let begin, let layer, let spec):
            let (bytes, rows) = try await sendLayer(begin, layer: layer, spec: spec, gradients: gradients, pool: pool, outbound: outbound)
            summary.bytesSent += bytes
            options.metrics.sent(bytes: bytes, rows: rows)
            summary.layersSent += 1
        case .answerPower(let request, let layer):
            let reply = try await pool.runIfActive { try gradients.answer(request, layer: layer) }
            try await outbound.write(.powerReply(reply))
            summary.bytesSent += reply.payload.readableBytes
            summary.powerReplies += 1
            // The gradient rows this worker multiplied: those of its share, not the layer's.
            let rows = gradients.productSpans(of: layer, side: .range).reduce(0) { $0 + $1.count }
            options.metrics.sent(bytes: reply.payload.readableBytes, rows: rows)
        case .releaseLayer(let layer):
            gradients.release(layer)
        case .sendError(let error):
            try? await outbound.write(.error(error))
        case .closeConnection:
            return .closed
        case .finish(let done):
            logger.info("job done: adapter at \(done.adapterPath) (\(done.layers) layers)")
            outbound.finish()
            return .ended
        case .fail, .stop, .connect, .retry, .reconnect:
            return .ended
        }
        return .continue
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

    /// The shards of a layer, in send order: each part in turn, cut into bands of rows sized
    /// for its width (a whole layer: full rows, exactly as ``rowsPerShard(rows:cols:payloadBytes:spec:shardBytes:)`` sizes them).
    static func shardRegions(of parts: [LayerRegion], payloadBytes: Int, spec: JobSpec, shardBytes: Int) -> [LayerRegion] {
        parts.flatMap { part -> [LayerRegion] in
            let rows = rowsPerShard(rows: part.rows.count, cols: part.cols.count, payloadBytes: payloadBytes, spec: spec, shardBytes: shardBytes)
            return stride(from: part.rows.lowerBound, to: part.rows.upperBound, by: rows).map {
                LayerRegion(rows: $0..<Swift.min($0 + rows, part.rows.upperBound), cols: part.cols)
            }
        }
    }

    /// Streams this worker's share of one layer as shards, reading the next shard while the
    /// current one is written: each of its parts (``GradientReader/parts(of:)``: the whole layer,
    /// or the rectangles its blocks cover) in turn, cut into bands of rows sized by
    /// ``rowsPerShard(rows:cols:payloadBytes:spec:shardBytes:)`` on the part's width.
    private func sendLayer(_ begin: LayerBegin, layer: GradientLayer, spec: JobSpec, gradients: GradientReader, pool: NIOThreadPool,
                           outbound: NIOAsyncChannelOutboundWriter<WireMessage>) async throws -> (bytes: Int, rows: Int) {
        let dtype = spec.payloadDType
        let compress = spec.compression == .zstdShuffled
        let fromFile = spec.mode == .dense && gradients.sendsRowsFromFile(of: layer, as: dtype, compress: compress)
        let shardBytes = fromFile ? Swift.min(options.fileShardBytes, options.maxFrameLength / 2) : options.shardBytes
        let ranges = Self.shardRegions(of: gradients.parts(of: layer), payloadBytes: dtype.byteSize, spec: spec, shardBytes: shardBytes)
        func read(_ region: LayerRegion) -> Task<EncodedShard, Error> {
            Task { try await pool.runIfActive { try gradients.encode(layer, region: region, as: dtype, compress: compress) } }
        }
        var checksum = ShardChecksum()   // of the shard checksums: the commit's
        var sent = 0
        let started = ContinuousClock.now
        var next = read(ranges[0])
        for (position, region) in ranges.enumerated() {
            let shard = try await next.value
            if position + 1 < ranges.count { next = read(ranges[position + 1]) }
            checksum.addShard(shard.checksum)
            let (range, colStart, cols) = (region.rows, UInt64(region.cols.lowerBound), UInt64(region.cols.count))
            let message: Shard
            if let file = shard.file {
                message = Shard(layerIndex: begin.layerIndex, rowStart: UInt64(range.lowerBound), rowCount: UInt32(range.count), cols: cols,
                                dtype: spec.payloadDType, payloadFile: file, checksum: shard.checksum, attempt: begin.attempt, colStart: colStart)
            } else {
                message = Shard(
                    layerIndex: begin.layerIndex, rowStart: UInt64(range.lowerBound), rowCount: UInt32(range.count), cols: cols,
                    dtype: spec.payloadDType, compression: shard.compressed == nil ? .uncompressed : .zstdShuffled,
                    uncompressedBytes: UInt64(shard.uncompressed.readableBytes), payload: shard.compressed ?? shard.uncompressed,
                    checksum: shard.checksum, attempt: begin.attempt, colStart: colStart)
            }
            try await outbound.write(.shard(message))
            sent += message.payloadBytes
            if let limit = options.maxBytesPerSecond, limit > 0 {
                // Pace to the cap: sleep until the bytes sent so far are due.
                let due = started + .seconds(Double(sent) / limit)
                if due > .now { try await Task.sleep(until: due, clock: .continuous) }
            }
        }
        let rowCount = ranges.reduce(0) { $0 + $1.rows.count }
        try await outbound.write(.layerCommit(LayerCommit(layerIndex: begin.layerIndex, shardCount: UInt32(ranges.count), rowCount: UInt64(rowCount), checksum: checksum.value, attempt: begin.attempt)))
        logger.info("sent layer \(begin.layerIndex) '\(layer.name)' (\(layer.rows)×\(layer.cols), \(sent / 1_000_000) MB\(begin.attempt > 0 ? ", attempt \(begin.attempt)" : ""))")
        return (sent, rowCount)
    }
}
