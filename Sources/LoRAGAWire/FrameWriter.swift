import NIOCore

/// Writes ``WireMessage``s as frames, the outbound half of a connection's pipeline.
///
/// Every message is validated first, so a peer never receives a frame this module's
/// decoder would refuse. A shard's rows and a power matrix are not copied into the frame:
/// a small buffer with the length, type byte and fields goes first and the bulk buffer
/// after it, and NIO gathers the two into one `writev` — or, for a shard whose rows are a
/// file's bytes (``Shard/payloadFile``), sends them with `sendfile`. A `MessageToByteHandler`
/// would copy every shard into its own buffer.
public final class FrameWriter: ChannelOutboundHandler, RemovableChannelHandler {
    public typealias OutboundIn = WireMessage
    public typealias OutboundOut = IOData

    /// Largest `length` field this writer produces; match the peer's decoder.
    public let maxFrameLength: Int

    public init(maxFrameLength: Int = WireProtocol.defaultMaxFrameLength) {
        precondition(maxFrameLength >= 1, "maxFrameLength must allow at least the type byte")
        self.maxFrameLength = maxFrameLength
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let message = unwrapOutboundIn(data)
        var head = context.channel.allocator.buffer(capacity: WireProtocol.lengthFieldBytes + 1 + Shard.headerBytes)
        do {
            if let bulk = try message.encodeFrameHead(into: &head, maxFrameLength: maxFrameLength) {
                context.write(wrapOutboundOut(.byteBuffer(head)), promise: nil)
                context.write(wrapOutboundOut(bulk), promise: promise)
            } else {
                context.write(wrapOutboundOut(.byteBuffer(head)), promise: promise)
            }
        } catch {
            promise?.fail(error)
            context.fireErrorCaught(error)
        }
    }
}

@available(*, unavailable)
extension FrameWriter: Sendable {}
