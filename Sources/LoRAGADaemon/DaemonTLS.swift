import LoRAGAWire
import NIOCore
import NIOSSL

/// TLS for the coordinator–worker connection (swift-nio-ssl). Gradients can leak training
/// data, so on a shared network they travel encrypted; the HMAC handshake still proves
/// each worker knows the job's secret inside the TLS session.
public enum DaemonTLS {
    /// The coordinator's context: its certificate chain and key, and optionally a CA whose
    /// client certificates every worker must present (mutual TLS).
    public static func serverContext(certificate: String, key: String, clientCA: String? = nil) throws -> NIOSSLContext {
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(certificate).map { NIOSSLCertificateSource.certificate($0) }
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain, privateKey: .privateKey(try NIOSSLPrivateKey(file: key, format: .pem)))
            configuration.minimumTLSVersion = .tlsv12
            if let clientCA {
                configuration.trustRoots = .file(clientCA)
                // Workers are identified by the HMAC handshake; the certificate proves membership.
                configuration.certificateVerification = .noHostnameVerification
            }
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw JobError(.usage, "TLS: cannot load --tls-cert \(certificate) / --tls-key \(key)\(clientCA.map { " / --tls-client-ca \($0)" } ?? ""): \(error)")
        }
    }

    /// A worker's context: the CA that signed the coordinator's certificate, and optionally
    /// a client certificate and key for mutual TLS.
    public static func clientContext(ca: String, certificate: String? = nil, key: String? = nil) throws -> NIOSSLContext {
        do {
            var configuration = TLSConfiguration.makeClientConfiguration()
            configuration.minimumTLSVersion = .tlsv12
            configuration.trustRoots = .file(ca)
            if let certificate, let key {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            } else if (certificate == nil) != (key == nil) {
                throw JobError(.usage, "TLS: --tls-cert and --tls-key go together")
            }
            return try NIOSSLContext(configuration: configuration)
        } catch let error as JobError {
            throw error
        } catch {
            throw JobError(.usage, "TLS: cannot load --tls-ca \(ca)\(certificate.map { " / --tls-cert \($0)" } ?? ""): \(error)")
        }
    }

    /// Whether `error` came from the TLS layer (a handshake that failed, a bad certificate).
    public static func isTLSError(_ error: Error) -> Bool {
        error is NIOSSLError || error is BoringSSLError || error is NIOSSLExtraError
    }

    /// The message a plaintext worker gets from a coordinator that requires TLS.
    public static let plaintextRefusal = "this coordinator requires TLS: give the worker --tls-ca (the CA that signed the coordinator's --tls-cert)"
}

/// First handler of a TLS coordinator's connections. A TLS client speaks first (its
/// ClientHello starts with byte 0x16); a plaintext lora-ga worker instead waits for the
/// coordinator's challenge, so both sides would wait forever. When the first byte is not a
/// TLS handshake record, or nothing arrives within `patience`, this answers in the plaintext
/// wire protocol with an error saying TLS is required, and closes: the worker fails at once
/// with that message. Otherwise it steps aside for the TLS handler.
public final class PlaintextPeerDetector: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer

    let patience: TimeAmount
    private var timer: Scheduled<Void>?
    private var decided = false

    /// - Parameter patience: how long a silent peer may wait before it is told; generous,
    ///   since a TLS client's ClientHello on a loaded machine or a slow link must never be
    ///   mistaken for silence (that would refuse a correct worker).
    public init(patience: TimeAmount = .seconds(3)) {
        self.patience = patience
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { schedule(context) }
    }

    public func channelActive(context: ChannelHandlerContext) {
        schedule(context)
        context.fireChannelActive()
    }

    private func schedule(_ context: ChannelHandlerContext) {
        guard timer == nil else { return }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: patience) {
            let (handler, context) = loopBound.value
            handler.refusePlaintext(context)
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !decided else { return context.fireChannelRead(data) }
        let buffer = unwrapInboundIn(data)
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
        decided = true
        timer?.cancel()
        if first == 0x16 {
            context.fireChannelRead(data)
            context.pipeline.syncOperations.removeHandler(self, promise: nil)
        } else {
            refusePlaintext(context)
        }
    }

    private func refusePlaintext(_ context: ChannelHandlerContext) {
        decided = true
        var frame = context.channel.allocator.buffer(capacity: 256)
        try? WireMessage.error(ErrorMessage(code: .badVersion, message: DaemonTLS.plaintextRefusal)).encodeFrame(into: &frame)
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(NIOAny(frame)).whenComplete { _ in bound.value.close(promise: nil) }
    }
}

/// First handler of a plaintext coordinator's connections: a peer whose first byte opens a
/// TLS handshake record (0x16) is a worker given --tls-ca; it is reported once through
/// `onTLSClient` (so the coordinator's log says what is wrong, not only "protocol error") and
/// dropped. Any other peer is left to the wire protocol: this handler steps aside.
public final class TLSClientDetector: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer

    let onTLSClient: @Sendable (SocketAddress?) -> Void

    public init(onTLSClient: @escaping @Sendable (SocketAddress?) -> Void) {
        self.onTLSClient = onTLSClient
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return }
        if first == 0x16 {
            onTLSClient(context.channel.remoteAddress)
            context.close(promise: nil)
        } else {
            context.fireChannelRead(data)
            context.pipeline.syncOperations.removeHandler(self, promise: nil)
        }
    }
}
