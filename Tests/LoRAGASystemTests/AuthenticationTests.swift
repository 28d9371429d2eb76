import Foundation
import Logging
import NIOCore
import NIOPosix
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGADaemon
import LoRAGAWire
import LoRAGAWorker

/// Workers must prove they know the job's secret; nobody else gets near the job.
@Suite(.serialized) struct AuthenticationTests {
    static let secret = try! JobSecret(bytes: Array("correct horse battery staple 42".utf8))

    @Test func secretsShorterThan16BytesAreRefused() {
        #expect(throws: SecretError.self) { try JobSecret(bytes: Array("short\n".utf8)) }
        // A trailing newline (as `echo` writes) is not part of the secret.
        let a = try! JobSecret(bytes: Array("0123456789abcdef\n".utf8)), b = try! JobSecret(bytes: Array("0123456789abcdef".utf8))
        let challenge = Bytes32.random()
        #expect(a.proof(challenge: challenge, workerID: "w", sessionNonce: 1) == b.proof(challenge: challenge, workerID: "w", sessionNonce: 1))
    }

    @Test func nonLoopbackListenWithoutSecretIsRefusedUnlessInsecure() throws {
        let layers = try LayeredSettings(configFile: nil, environment: [:])
        let error = #expect(throws: JobError.self) {
            _ = try CoordinatorSettings(flags: ["listen": "0.0.0.0:7070", "workers": "2", "out": "/tmp/x"], layers: layers)
        }
        #expect(error?.message.contains("without a shared secret") == true)
        _ = try CoordinatorSettings(flags: ["listen": "0.0.0.0:7070", "workers": "2", "out": "/tmp/x", "insecure": "true"], layers: layers)
        _ = try CoordinatorSettings(flags: ["listen": "127.0.0.1:7070", "workers": "2", "out": "/tmp/x"], layers: layers)
    }

    @Test func wrongOrMissingSecretAndReplayedHelloAreRefusedAndTheJobFinishes() async throws {
        let out = try Fixtures.scratch("auth")
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 4, alpha: 8), mode: .power), expectedWorkers: 1, outputDirectory: out)
        options.secret = Self.secret
        let server = CoordinatorServer(host: "127.0.0.1", port: 0, options: options, logger: DistributedJobTests.quiet)
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        async let summary = server.run { port, _ in continuation.yield(port) }
        var iterator = ports.makeAsyncIterator()
        let port = await iterator.next()!

        func worker(_ id: String, secret: JobSecret?) async -> Result<WorkerSummary, Error> {
            var workerOptions = WorkerOptions(host: "127.0.0.1", port: port, id: id, gradientPaths: [Fixtures.minilmWorkers[0]])
            workerOptions.secret = secret
            workerOptions.connectTimeout = .seconds(10)
            do { return .success(try await WorkerClient(options: workerOptions, logger: DistributedJobTests.quiet).run()) } catch { return .failure(error) }
        }
        for (id, secret) in [("no-secret", nil), ("wrong-secret", try JobSecret(bytes: Array("not the right secret at all".utf8)))] {
            let result = await worker(id, secret: secret)
            guard case .failure(let error as WorkerError) = result else { Issue.record("\(id) was not refused: \(result)"); continue }
            #expect(error.isFinal)   // no retry loop on a refused secret
            #expect(error.message.contains("authentication failed"), "\(error)")
        }
        // A Hello proven against another connection's challenge (a captured handshake) is refused.
        let replayed = Hello(protocolVersion: WireProtocol.version, workerID: "replay", sessionNonce: 7,
                             authProof: Self.secret.proof(challenge: .random(), workerID: "replay", sessionNonce: 7))
        let answer = try await Self.sendHello(replayed, port: port)
        #expect(answer.contains("badAuth"), "\(answer)")
        // The real worker still runs the job.
        let good = await worker("good", secret: Self.secret)
        #expect((try? good.get()) != nil, "\(good)")
        #expect(try await summary.layers == 12)
    }

    /// Sends `hello` on a fresh connection and reports the coordinator's reply.
    static func sendHello(_ hello: Hello, port: Int) async throws -> String {
        let channel = try await Fixtures.wireConnection(port: port)
        return try await channel.executeThenClose { inbound, outbound in
            var messages = inbound.makeAsyncIterator()
            _ = try await messages.next()   // the challenge, ignored on purpose
            try await outbound.write(.hello(hello))
            switch try await messages.next() {
            case .error(let error)?: return "\(error.code): \(error.message)"
            case let other?: return "unexpected \(other.type)"
            case nil: return "closed"
            }
        }
    }
}
