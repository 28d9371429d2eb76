import Logging
import LoRAGAWire
import NIOCore
import NIOPosix
import NIOSSL
import LoRAGADaemon

/// The coordinator's TCP side: accepts workers, frames messages, and hands them to the
/// engine one at a time per connection (so a busy engine slows the sender down through
/// TCP, never by buffering). Returns when the job has finished or failed.
public struct CoordinatorServer: Sendable {
    public let host: String
    public let port: Int
    public let options: CoordinatorOptions
    public let maxFrameLength: Int
    public var logger: Logger
    /// Serve TLS with this context (workers then connect with `--tls-ca`); nil: plaintext.
    public var tls: NIOSSLContext?

    public init(host: String, port: Int, options: CoordinatorOptions, maxFrameLength: Int = WireProtocol.defaultMaxFrameLength,
                tls: NIOSSLContext? = nil, logger: Logger) {
        self.tls = tls
        self.host = host
        self.port = port
        self.options = options
        self.maxFrameLength = maxFrameLength
        self.logger = logger
    }

    /// Binds, runs the job, and returns its summary. `onListening` gets the bound port (useful with port 0) and the engine.
    public func run(onListening: @Sendable (Int, CoordinatorEngine) async -> Void = { _, _ in }) async throws -> CoordinatorSummary {
        let computeGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            let summary = try await run(computeGroup: computeGroup, onListening: onListening)
            try? await computeGroup.shutdownGracefully()
            return summary
        } catch {
            try? await computeGroup.shutdownGracefully()
            throw error
        }
    }

    private func run(computeGroup: MultiThreadedEventLoopGroup, onListening: @Sendable (Int, CoordinatorEngine) async -> Void) async throws -> CoordinatorSummary {
        let engine = try CoordinatorEngine(options: options, computeLoop: computeGroup.next(), logger: logger)
        let maxFrameLength = self.maxFrameLength
        let tls = self.tls
        let logger = self.logger
        let acceptLogger = logger
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(AcceptErrorLogger(logger: acceptLogger)) }
            }
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64 << 10, initial: 256 << 10, maximum: 1 << 20))
            .bind(host: host, port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        // A plaintext worker would wait for our challenge while TLS waits for its
                        // ClientHello: the detector tells it, in plaintext, that TLS is required.
                        try channel.pipeline.syncOperations.addHandler(PlaintextPeerDetector())
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    } else {
                        try channel.pipeline.syncOperations.addHandler(TLSClientDetector { peer in
                            logger.warning("a TLS client connected from \(peer.map { "\($0)" } ?? "?"), but this coordinator speaks plaintext: give it --tls-cert and --tls-key, or drop the worker's --tls-ca")
                        })
                    }
                    // Until the peer's Hello is accepted, its decoder takes only a small Hello.
                    let gate = HandshakeGate()
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(StreamingFrameDecoder(maxFrameLength: maxFrameLength, gate: gate)))
                    try channel.pipeline.syncOperations.addHandler(FrameWriter(maxFrameLength: maxFrameLength))
                    // Little buffered per connection (shard pieces are reads of ≤ 64 KB; a whole
                    // compressed shard is ≤ 4 MB): a busy engine turns into TCP backpressure
                    // quickly instead of into coordinator memory.
                    let wrapped = try NIOAsyncChannel<InboundFrame, WireMessage>(
                        wrappingChannelSynchronously: channel,
                        configuration: .init(backPressureStrategy: .init(lowWatermark: 4, highWatermark: 16), isOutboundHalfClosureEnabled: true))
                    return AcceptedConnection(channel: wrapped, gate: gate)
                }
            }
        let boundPort = server.channel.localAddress?.port ?? port
        logger.info("listening on \(host):\(boundPort)\(tls == nil ? "" : " (TLS)"), waiting for \(options.expectedWorkers) workers")
        await engine.startGatherTimer()
        await onListening(boundPort, engine)

        return try await withThrowingTaskGroup(of: CoordinatorSummary?.self) { group in
            group.addTask {
                try await withThrowingDiscardingTaskGroup { connections in
                    try await server.executeThenClose { inbound in
                        for try await connection in inbound {
                            connections.addTask { await CoordinatorServer.serve(connection.channel, gate: connection.gate, engine: engine) }
                        }
                    }
                }
                return nil
            }
            group.addTask {
                // The job's end: let connections deliver JobDone / errors (workers hang up when
                // they have read it), then stop accepting.
                do {
                    let summary = try await engine.result()
                    await CoordinatorServer.waitForHangUps(engine, atMost: .milliseconds(500))
                    return summary
                } catch {
                    await CoordinatorServer.waitForHangUps(engine, atMost: .milliseconds(500))
                    throw error
                }
            }
            var outcome: CoordinatorSummary?
            do {
                while let next = try await group.next() {
                    if let summary = next {
                        outcome = summary
                        break
                    }
                }
            } catch {
                group.cancelAll()
                throw error
            }
            group.cancelAll()
            guard let outcome else { throw JobError("the coordinator stopped listening before the job finished") }
            return outcome
        }
    }

    /// Returns once every connection has closed, or after `limit`.
    static func waitForHangUps(_ engine: CoordinatorEngine, atMost limit: Duration) async {
        let deadline = ContinuousClock.now + limit
        while await engine.openConnections > 0, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    /// An accepted connection and the gate its decoder checks before the handshake.
    struct AcceptedConnection: Sendable {
        let channel: NIOAsyncChannel<InboundFrame, WireMessage>
        let gate: HandshakeGate
    }

    /// Which half of a connection ended first.
    enum Side: Sendable {
        case reader, readerFailed, writer, timer
    }

/// One connection: a reader feeding the engine and a writer draining its outbox.
    static func serve(_ connection: NIOAsyncChannel<InboundFrame, WireMessage>, gate: HandshakeGate, engine: CoordinatorEngine) async {
        let (outbox, continuation) = AsyncStream<Outgoing>.makeStream()
        let id = await engine.connected(continuation, gate: gate)
        do {
            try await connection.executeThenClose { inbound, outbound in
                try await withThrowingTaskGroup(of: Side.self) { group in
                    group.addTask {
                        for await item in outbox {
                            switch item {
                            case .message(let message):
                                try await outbound.write(message)
                            case .close:
                                // Half-close: pending frames are flushed first, then the peer sees EOF.
                                outbound.finish()
                                return .writer
                            }
                        }
                        outbound.finish()
                        return .writer
                    }
                    group.addTask {
                        do {
                            for try await frame in inbound {
                                switch frame {
                                case .message(let message): await engine.received(message, from: id)
                                case .shardPiece(let piece): await engine.received(piece, from: id)
                                }
                            }
                        } catch let error as WireError {
                            // Garbage or an oversized frame: answer with the reason; the writer then closes.
                            await engine.protocolError(error, on: id)
                            return .readerFailed
                        }
                        return .reader
                    }
                    var first = try await group.next()
                    if first == .readerFailed { first = try await group.next() }
                    if first == .writer {
                        // We closed: let the peer read our last frame and hang up, but not forever.
                        group.addTask {
                            try? await Task.sleep(for: .seconds(2))
                            return .timer
                        }
                        _ = try await group.next()
                    }
                    group.cancelAll()
                }
            }
        } catch {
            // The connection's end is reported to the engine below; errors were logged there.
        }
        await engine.closed(id)
    }
}
