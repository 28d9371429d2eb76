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
        let dtype = TensorDType(rawValue: spec.payloadDType.description) ?? .f32
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

struct EncodedShard: Sendable {
    var uncompressed: ByteBuffer
    var compressed: ByteBuffer?
    /// The rows as a gradient file stores them, sent from there with `sendfile`; `uncompressed`
    /// is then empty.
    var file: FileRegion?
    /// ``ShardChecksum`` of the payload as sent (`compressed` when there is one).
    var checksum: UInt64

    init(uncompressed: ByteBuffer, compressed: ByteBuffer? = nil, checksum: UInt64) {
        self.uncompressed = uncompressed
        self.compressed = compressed
        self.checksum = checksum
    }

    init(file: FileRegion, checksum: UInt64) {
        self.uncompressed = ByteBuffer()
        self.file = file
        self.checksum = checksum
    }
}

/// The worker's gradient files behind a lock: reads run on the worker's compute thread,
/// one at a time (file readers and the zstd context are not thread-safe).
final class GradientReader: @unchecked Sendable {
    let files: GradientFileSet
    private let lock = NIOLock()
    private var sources: [String: SummedRowBlocks] = [:]
    private let codec = ZstdCodec()
    /// The gradient file as `sendfile` reads it (a duplicate of its descriptor), opened on the
    /// first shard sent from it and closed with the reader.
    private var sendHandle: NIOFileHandle?
    /// Cleared when the file turns out not to support `sendfile` or `mmap` (probed before the
    /// first shard; some file systems support neither): shards are then read into buffers.
    private var sendsFromFile = true
    /// Told once when shards fall back to buffers.
    var logger: Logger?

    /// A worker holds its share of each layer: entries its files leave uncovered are zeros
    /// here, and other workers' blocks (whoever checks the whole job's coverage) cover them.
    init(paths: [String]) throws {
        files = try GradientFileSet(paths: paths, uncovered: .zero)
    }

    /// The part of `layer` this worker's files hold: the blocks' rectangles, the rows and
    /// columns they touch (`coveredRows`, `coveredCols`), and what they leave uncovered.
    func coverage(of layer: GradientLayer) -> LayerCoverage {
        files.coverage(of: layer)
    }

    deinit {
        try? sendHandle?.close()
    }

    var inputBytes: Int {
        files.files.reduce(0) { total, file in
            total + ((try? FileManager.default.attributesOfItem(atPath: file.path)[.size] as? Int) ?? 0)
        }
    }

    var announcement: [LayerInfo] {
        files.layers.map { layer in
            LayerInfo(name: layer.name, rows: UInt64(layer.rows), cols: UInt64(layer.cols),
                      sourceDType: WireDType.allCases.first { $0.description == layer.dtype } ?? .f32,
                      regions: files.hasBlocks ? coverage(of: layer).regions : [])
        }
    }

    /// Forgets a finished layer's reader and buffers, so a worker's memory does not grow by one
    /// block set per layer over the job.
    func release(_ layer: GradientLayer) {
        lock.withLock { _ = sources.removeValue(forKey: layer.name) }
    }

    /// - Parameter productWidth: k of the power requests the source answers (sizes its blocks).
    private func withSource<T>(_ layer: GradientLayer, blockRows: Int? = nil, productWidth: Int? = nil, _ body: (inout SummedRowBlocks) throws -> T) rethrows -> T {
        try lock.withLock {
            // Take it out while in use: a copy left in the dictionary would make every block
            // write copy the whole buffer (copy-on-write; profiled at a third of the worker's CPU).
            var source = sources.removeValue(forKey: layer.name)
                ?? productWidth.map { files.rowBlocks(of: layer, productWidth: $0) }
                ?? files.rowBlocks(of: layer)
            if let blockRows, source.blockRows < blockRows {
                source = files.rowBlocks(of: layer, blockRows: blockRows)
            }
            defer { sources[layer.name] = source }
            return try body(&source)
        }
    }

    /// Rows `range` of the summed layer in the payload dtype, plus a zstd'd shuffled copy when asked.
    func encode(_ layer: GradientLayer, rows range: Range<Int>, as dtype: TensorDType, compress: Bool) throws -> EncodedShard {
        let count = range.count * layer.cols
        if dtype == .f32, !compress {
            if let shard = try storedF32Shard(layer, rows: range) { return shard }
            if let (buffer, checksum) = try readF32Payload(layer, rows: range, count: count) {
                return EncodedShard(uncompressed: buffer, checksum: checksum)
            }
        }
        return try withSource(layer, blockRows: range.count) { source in
            try source.withSummedRows(range) { block in
                var buffer = ByteBufferAllocator().buffer(capacity: block.values.count * dtype.byteSize)
                buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: block.values.count * dtype.byteSize) { raw in
                    FloatCodec.encode(block.values, as: dtype, into: raw)
                    return block.values.count * dtype.byteSize
                }
                guard compress else {
                    return EncodedShard(uncompressed: buffer, compressed: nil, checksum: buffer.withUnsafeReadableBytes { ShardChecksum.hash($0) })
                }
                let shuffled = buffer.withUnsafeReadableBytes { ByteShuffle.shuffle($0, elementSize: dtype.byteSize) }
                let packed = try codec.compress(shuffled, level: 1)   // already under the lock
                return EncodedShard(uncompressed: buffer, compressed: ByteBuffer(bytes: packed), checksum: ShardChecksum.hash(packed))
            }
        }
    }

    /// A worker with one gradient file that stores the layer as F32 sends the rows as the file
    /// holds them: it maps them (no copy), hashes them and checks them for NaN/Inf in one pass
    /// ~256 KB at a time, and the socket gets them by `sendfile` from the page cache. That saves the read
    /// into a buffer and the copy into the socket, cutting the worker's CPU and memory per shard.
    /// Nil when the layer needs summing (several files) or converting, when
    /// its rows are not Float-aligned in the file, or when the file cannot be sent or mapped
    /// (see `sendHandle(for:)`).
    ///
    /// If the file changes between the hash and the send, the coordinator's check of the
    /// checksum refuses the shard, and of its values a NaN: nothing unchecked is summed.
    private func storedF32Shard(_ layer: GradientLayer, rows range: Range<Int>) throws -> EncodedShard? {
        #if _endian(little)
        guard storesRowsAsSent(layer), let file = files.soleWholeFile(of: layer) else { return nil }
        return try lock.withLock { () throws -> EncodedShard? in
            guard sendsFromFile, let handle = sendHandle(for: file) else { return nil }
            do {
                // Mapped a few MB at a time: the region sent is the whole shard, but only the
                // rows being hashed need to be mapped (and count in the worker's RSS).
                var checksum = ShardChecksum()
                var region: Range<Int>?
                let mappedRows = Swift.max(1, Self.mappedBytes / (4 * layer.cols))
                for start in stride(from: range.lowerBound, to: range.upperBound, by: mappedRows) {
                    let rows = start..<Swift.min(start + mappedRows, range.upperBound)
                    try file.withStoredRows(layer.name, rows: rows) { bytes, fileOffset in
                        region = (region?.lowerBound ?? fileOffset)..<(fileOffset + bytes.count)
                        try Self.hashAndCheck(bytes, rows: rows, into: &checksum, layer: layer, path: file.path)
                    }
                }
                guard let region else { return nil }
                return EncodedShard(file: FileRegion(fileHandle: handle, readerIndex: region.lowerBound, endIndex: region.upperBound), checksum: checksum.value)
            } catch let error as SafeTensorsError {
                // The file cannot be mapped (or the rows are not where the header says, which
                // the read into a buffer reports properly): read shards into buffers from now on.
                stopSendingFromFile(file, because: "\(error)")
                return nil
            }
        }
        #else
        return nil
        #endif
    }

    /// Whether ``encode(_:rows:as:compress:)`` sends `layer`'s rows from the file (sendfile)
    /// rather than from a buffer: one file storing it as F32 at a Float-aligned offset, sent as
    /// F32 uncompressed, from a file the kernel can `sendfile` from (probed now if not yet). Shards
    /// of such a layer may be large: they cost no memory (``WorkerOptions/fileShardBytes``).
    /// Mapping can still fail later; those shards are then read into buffers.
    func sendsRowsFromFile(of layer: GradientLayer, as dtype: TensorDType, compress: Bool) -> Bool {
        #if _endian(little)
        guard dtype == .f32, !compress, storesRowsAsSent(layer) else { return false }
        return lock.withLock { sendsFromFile && sendHandle(for: files.files[0]) != nil }
        #else
        return false
        #endif
    }

    /// One file, storing `layer` whole as F32 at a Float-aligned offset: its bytes are the
    /// payload, nothing to sum, place or convert, and mapped they are Floats (a page-aligned
    /// mapping keeps the offset's alignment).
    private func storesRowsAsSent(_ layer: GradientLayer) -> Bool {
        guard files.files.count == 1, layer.dtype == TensorDType.f32.rawValue,
              let file = files.soleWholeFile(of: layer), let offset = try? file.storedOffset(of: layer.name) else { return false }
        return offset % MemoryLayout<Float>.alignment == 0
    }

    /// The handle `sendfile` reads `file` through, made on first use; nil (and no more tries)
    /// when the kernel cannot `sendfile` from it, or no descriptor is left for it. Called under `lock`.
    private func sendHandle(for file: SafeTensorsFile) -> NIOFileHandle? {
        if let sendHandle { return sendHandle }
        let descriptor: Int32
        do {
            descriptor = try file.duplicateDescriptor()
        } catch {
            stopSendingFromFile(file, because: "\(error)")
            return nil
        }
        guard Self.canSendfile(from: descriptor) else {
            close(descriptor)
            stopSendingFromFile(file, because: "the kernel cannot sendfile from it")
            return nil
        }
        let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: descriptor)
        sendHandle = handle
        return handle
    }

    private func stopSendingFromFile(_ file: SafeTensorsFile, because reason: String) {
        sendsFromFile = false
        logger?.info("\(file.path): shards are read into buffers, not sent from the file (\(reason))")
    }

    /// Feeds mapped F32 rows `rows` (Float-aligned, see `storesRowsAsSent`) to `checksum`,
    /// checking them for NaN/Inf in the same pass, ~256 KB at a time. A NaN/Inf is an error
    /// naming the file, layer and row.
    private static func hashAndCheck(_ bytes: UnsafeRawBufferPointer, rows range: Range<Int>, into checksum: inout ShardChecksum, layer: GradientLayer, path: String) throws {
        guard let base = bytes.baseAddress else { return }
        precondition(Int(bitPattern: base) % MemoryLayout<Float>.alignment == 0, "mapped rows of '\(layer.name)' are not Float-aligned")
        let floats = base.assumingMemoryBound(to: Float.self)
        let pieceRows = Swift.max(1, hashedPieceBytes / (4 * layer.cols))
        for start in stride(from: range.lowerBound, to: range.upperBound, by: pieceRows) {
            let rows = start..<Swift.min(start + pieceRows, range.upperBound)
            let values = UnsafeBufferPointer(start: floats + (rows.lowerBound - range.lowerBound) * layer.cols, count: rows.count * layer.cols)
            guard checksum.updateCheckingFinite(float32: UnsafeRawBufferPointer(values)) else {
                let index = RowBlock(rowStart: rows.lowerBound, rowCount: rows.count, cols: layer.cols, values: values).firstNonFiniteIndex()
                precondition(index != nil, "the hash's finiteness check flagged rows \(rows) of '\(layer.name)', the scan finds nothing")
                throw GradientError.nonFinite(layer: layer.name, source: path, row: rows.lowerBound + index! / layer.cols)
            }
        }
    }

    /// Rows of a file-sent shard mapped at a time to be hashed (its region is sent whole).
    private static let mappedBytes = 4 << 20

    /// Whether the kernel can `sendfile` from `descriptor`: one byte into a pipe. Linux only
    /// (elsewhere `sendfile` has other semantics, and shards are read into buffers).
    static func canSendfile(from descriptor: Int32) -> Bool {
        #if os(Linux)
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { return false }
        defer {
            close(ends[0])
            close(ends[1])
        }
        var offset: off_t = 0
        return sendfile(ends[1], descriptor, &offset, 1) == 1
        #else
        return false
        #endif
    }

    /// F32 payloads are read (and summed) straight into the frame's buffer: one copy fewer
    /// per shard than going through the block buffer. Nil if the buffer is not Float-aligned.
    ///
    /// Read, checked and hashed ~256 KB of rows at a time, so the check and the hash find the
    /// bytes in cache rather than reading a whole shard back from memory.
    private func readF32Payload(_ layer: GradientLayer, rows range: Range<Int>, count: Int) throws -> (ByteBuffer, UInt64)? {
        var buffer = ByteBufferAllocator().buffer(capacity: count * 4)
        let aligned = buffer.withUnsafeMutableWritableBytes { Int(bitPattern: $0.baseAddress) % MemoryLayout<Float>.alignment == 0 }
        guard aligned else { return nil }
        var checksum = ShardChecksum()
        let pieceRows = Swift.max(1, Self.hashedPieceBytes / (4 * layer.cols))
        _ = try lock.withLock {
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count * 4) { raw in
                try UnsafeMutableRawBufferPointer(rebasing: raw[0..<(count * 4)]).withMemoryRebound(to: Float.self) { floats in
                    for start in stride(from: range.lowerBound, to: range.upperBound, by: pieceRows) {
                        let rows = start..<Swift.min(start + pieceRows, range.upperBound)
                        let piece = floats[((rows.lowerBound - range.lowerBound) * layer.cols)..<((rows.upperBound - range.lowerBound) * layer.cols)]
                        try files.readSummedRows(of: layer, rows: rows, into: piece)
                        checksum.update(UnsafeRawBufferPointer(UnsafeMutableBufferPointer(rebasing: piece)))
                    }
                }
                return count * 4
            }
        }
        return (buffer, checksum.value)
    }

    /// Bytes of rows read and hashed at a time by ``readF32Payload(_:rows:count:)``.
    private static let hashedPieceBytes = 256 << 10

    /// G_w · X or G_wᵀ · X for a power-iteration request on `layer`, full size (the reply's
    /// wire shape), computed from this worker's blocks only (``rangeProduct(with:layer:)``, ``coRangeProduct(with:layer:)``).
    func answer(_ request: PowerRequest, layer: GradientLayer) throws -> PowerReply {
        let x = Matrix(rows: Int(request.matrixRows), cols: Int(request.matrixCols), storage: request.values)
        let product = switch request.side {
        case .range: try rangeProduct(with: x, layer: layer)
        case .corange: try coRangeProduct(with: x, layer: layer)
        }
        return PowerReply(layerIndex: request.layerIndex, round: request.round, side: request.side,
                          matrixRows: UInt32(product.rows), matrixCols: UInt32(product.cols), values: product.storage)
    }

    /// Y = G_w · P for this worker's share G_w = Σ_b E_b(G_b) of `layer`:
    /// Y[r0:r1, :] += G_b · P[c0:c1, :], only over the rows and columns its blocks touch, so a
    /// worker holding 1/N of the layer does 1/N of the multiplications. `P` is in × k; the
    /// result is out × k and zero outside `coverage(of: layer).coveredRows`.
    func rangeProduct(with p: Matrix, layer: GradientLayer) throws -> Matrix {
        try withSource(layer, productWidth: p.cols) { try $0.blockProduct(with: p) }
    }

    /// Z = G_wᵀ · Q for this worker's share (Z[c0:c1, :] += G_bᵀ · Q[r0:r1, :]). `Q` is out × k;
    /// the result is in × k and zero outside `coverage(of: layer).coveredCols`.
    func coRangeProduct(with q: Matrix, layer: GradientLayer) throws -> Matrix {
        try withSource(layer, productWidth: q.cols) { try $0.blockTransposedProduct(with: q) }
    }
}
