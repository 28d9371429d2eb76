import Logging
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// Sits on the listening socket and says, once, when accepting fails because the process is
/// out of file descriptors. NIO's accept back-off (next in the pipeline) then retries a
/// second later instead of spinning; without this line the condition would be silent.
final class AcceptErrorLogger: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = Any
    private let logger: Logger
    // Touched only on the listening channel's event loop.
    private var told = false

    init(logger: Logger) {
        self.logger = logger
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let error = error as? IOError, error.errnoCode == EMFILE || error.errnoCode == ENFILE, !told {
            told = true
            logger.error("out of file descriptors: new connections wait until some close (accepting backs off a second at a time); idle connections are closed after the handshake timeout. Raise the limit (ulimit -n) if this recurs")
        }
        context.fireErrorCaught(error)
    }
}
