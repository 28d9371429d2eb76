import Foundation
import LoRAGAFormats
import LoRAGAWire
import NIOCore
import NIOPosix

/// Paths of the bundled fixtures and scratch directories for system tests.
enum Fixtures {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")
    /// Real gradients of MiniLM (2 workers, BF16, 12 layers); see Fixtures/minilm-sample/README.md.
    static let minilm = root.appendingPathComponent("minilm-sample")
    static var minilmWorkers: [String] { ["w0", "w1"].map { minilm.appendingPathComponent($0).path } }

    /// A fresh, empty temporary directory, inside this test process's ``processScratch``.
    static func scratch(_ name: String = #function) throws -> String {
        let safe = name.filter { $0.isLetter || $0.isNumber }
        let path = processScratch + "/\(safe)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    /// `lora-ga-tests-<pid>` in the temporary directory: every scratch directory of this test
    /// process (jobs, checkpoints, gradients: ~160 MB per run). Removed when the process exits;
    /// the first use also removes those of test processes that are gone (killed, crashed).
    static let processScratch: String = {
        let temporary = FileManager.default.temporaryDirectory.path
        for name in (try? FileManager.default.contentsOfDirectory(atPath: temporary)) ?? [] where name.hasPrefix(scratchPrefix) {
            guard let pid = pid_t(name.dropFirst(scratchPrefix.count)), kill(pid, 0) != 0, errno == ESRCH else { continue }
            try? FileManager.default.removeItem(atPath: temporary + "/" + name)
        }
        let path = temporary + "/" + scratchPrefix + String(getpid())
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        atexit {
            try? FileManager.default.removeItem(atPath: FileManager.default.temporaryDirectory.path + "/" + Fixtures.scratchPrefix + String(getpid()))
        }
        return path
    }()

    static let scratchPrefix = "lora-ga-tests-"

    /// A bare wire-protocol connection to a coordinator on loopback, for tests that play a
    /// misbehaving or hand-written worker.
    static func wireConnection(port: Int) async throws -> NIOAsyncChannel<WireMessage, WireMessage> {
        try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder()))
                    try channel.pipeline.syncOperations.addHandler(FrameWriter())
                    return try NIOAsyncChannel<WireMessage, WireMessage>(wrappingChannelSynchronously: channel)
                }
            }
    }
}
