import NIOCore
import NIOHTTP1
import NIOPosix

/// Serves `GET /metrics` (Prometheus text format 0.0.4) over plain HTTP/1.1; anything else
/// is 404. Scrapes are rare and small, so one handler on NIO's shared event loops suffices.
public final class MetricsServer: Sendable {
    let channel: Channel
    /// The port bound (useful with port 0).
    public let port: Int

    /// Binds `host:port` and serves `metrics` until ``close()``.
    public static func start(host: String, port: Int, metrics: DaemonMetrics) async throws -> MetricsServer {
        do {
            let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.pipeline.configureHTTPServerPipeline().flatMap {
                        channel.pipeline.addHandler(MetricsHTTPHandler(metrics: metrics))
                    }
                }
                .bind(host: host, port: port).get()
            return MetricsServer(channel: channel, port: channel.localAddress?.port ?? port)
        } catch {
            throw JobError(.usage, "--metrics-listen \(host):\(port): cannot listen there (\(error))")
        }
    }

    init(channel: Channel, port: Int) {
        self.channel = channel
        self.port = port
    }

    public func close() async {
        try? await channel.close()
    }
}

final class MetricsHTTPHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let metrics: DaemonMetrics

    init(metrics: DaemonMetrics) {
        self.metrics = metrics
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(let request) = unwrapInboundIn(data) else { return }
        let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
        let found = path == "/metrics" && (request.method == .GET || request.method == .HEAD)
        let body = found ? metrics.exposition() : "not found: metrics are at /metrics\n"
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain; charset=utf-8")
        headers.add(name: "Content-Length", value: "\(body.utf8.count)")
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: found ? .ok : .notFound, headers: headers))), promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in bound.value.close(promise: nil) }
    }
}
