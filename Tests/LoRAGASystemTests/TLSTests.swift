import Foundation
import Logging
import NIOSSL
import Testing
import LoRAGACore
import LoRAGACoordinator
import LoRAGADaemon
import LoRAGAWire
import LoRAGAWorker

/// TLS between coordinator and workers, with a throwaway CA made by openssl at test time.
@Suite(.serialized) struct TLSTests {
    /// ca.pem, server.pem/server.key (for 127.0.0.1 and localhost), client.pem/client.key, all signed by the CA.
    static func certificates() throws -> String {
        let directory = try Fixtures.scratch("tls")
        func openssl(_ arguments: [String]) throws {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
            process.arguments = arguments
            process.currentDirectoryURL = URL(fileURLWithPath: directory)
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            try #require(process.terminationStatus == 0, "openssl \(arguments.joined(separator: " ")) failed")
        }
        try "subjectAltName=IP:127.0.0.1,DNS:localhost\n".write(toFile: directory + "/server.ext", atomically: true, encoding: .utf8)
        try openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=lora-ga test CA"])
        for name in ["server", "client"] {
            try openssl(["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "\(name).key", "-out", "\(name).csr", "-subj", "/CN=\(name == "server" ? "localhost" : "worker")"])
            try openssl(["x509", "-req", "-in", "\(name).csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "\(name).pem", "-days", "1"]
                + (name == "server" ? ["-extfile", "server.ext"] : []))
        }
        return directory
    }

    struct Coordinator {
        let port: Int
        let summary: Task<CoordinatorSummary, Error>
    }

    static func coordinator(tls: NIOSSLContext?, out: String) async throws -> Coordinator {
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 4, alpha: 8), mode: .power), expectedWorkers: 1, outputDirectory: out)
        options.gatherTimeout = .seconds(60)
        let server = CoordinatorServer(host: "127.0.0.1", port: 0, options: options, tls: tls, logger: DistributedJobTests.quiet)
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        let summary = Task { try await server.run { port, _ in continuation.yield(port) } }
        var iterator = ports.makeAsyncIterator()
        return Coordinator(port: await iterator.next()!, summary: summary)
    }

    static func worker(port: Int, tls: NIOSSLContext?, timeout: Duration = .seconds(30)) async -> Result<WorkerSummary, Error> {
        var options = WorkerOptions(host: "127.0.0.1", port: port, id: "w0", gradientPaths: [Fixtures.minilmWorkers[0]])
        options.tls = tls
        options.connectTimeout = timeout
        do { return .success(try await WorkerClient(options: options, logger: DistributedJobTests.quiet).run()) } catch { return .failure(error) }
    }

    @Test func aTLSJobRunsAndMutualTLSRefusesAWorkerWithoutACertificate() async throws {
        let certificates = try Self.certificates()
        let server = try DaemonTLS.serverContext(certificate: certificates + "/server.pem", key: certificates + "/server.key")
        let coordinator = try await Self.coordinator(tls: server, out: try Fixtures.scratch("tls-job"))
        let result = await Self.worker(port: coordinator.port, tls: try DaemonTLS.clientContext(ca: certificates + "/ca.pem"))
        #expect((try? result.get()) != nil, "\(result)")
        #expect(try await coordinator.summary.value.layers == 12)

        let mutual = try DaemonTLS.serverContext(certificate: certificates + "/server.pem", key: certificates + "/server.key", clientCA: certificates + "/ca.pem")
        let strict = try await Self.coordinator(tls: mutual, out: try Fixtures.scratch("mtls-job"))
        let anonymous = await Self.worker(port: strict.port, tls: try DaemonTLS.clientContext(ca: certificates + "/ca.pem"))
        guard case .failure(let refused as WorkerError) = anonymous else { Issue.record("a worker without a client certificate was not refused: \(anonymous)"); return }
        #expect(refused.isFinal && refused.kind == .usage, "\(refused)")
        let member = await Self.worker(port: strict.port, tls: try DaemonTLS.clientContext(
            ca: certificates + "/ca.pem", certificate: certificates + "/client.pem", key: certificates + "/client.key"))
        #expect((try? member.get()) != nil, "\(member)")
        #expect(try await strict.summary.value.layers == 12)
    }

    @Test func plaintextWorkerAgainstTLSCoordinatorFailsAtOnceWithAClearMessage() async throws {
        let certificates = try Self.certificates()
        let server = try DaemonTLS.serverContext(certificate: certificates + "/server.pem", key: certificates + "/server.key")
        let coordinator = try await Self.coordinator(tls: server, out: try Fixtures.scratch("tls-plain"))
        let started = ContinuousClock.now
        let result = await Self.worker(port: coordinator.port, tls: nil, timeout: .seconds(60))
        guard case .failure(let error as WorkerError) = result else { Issue.record("plaintext worker was not refused: \(result)"); return }
        #expect(ContinuousClock.now - started < .seconds(10))   // not after the 60 s connect timeout
        #expect(error.isFinal && error.kind == .usage && error.kind.exitCode == 2)
        #expect(error.message.contains("requires TLS") && error.message.contains("--tls-ca"), "\(error)")
        coordinator.summary.cancel()
    }

    @Test func tlsWorkerAgainstPlaintextCoordinatorFailsAtOnceWithAClearMessage() async throws {
        let certificates = try Self.certificates()
        let coordinator = try await Self.coordinator(tls: nil, out: try Fixtures.scratch("plain-tls"))
        let started = ContinuousClock.now
        let result = await Self.worker(port: coordinator.port, tls: try DaemonTLS.clientContext(ca: certificates + "/ca.pem"), timeout: .seconds(60))
        guard case .failure(let error as WorkerError) = result else { Issue.record("TLS worker was not refused: \(result)"); return }
        #expect(ContinuousClock.now - started < .seconds(10))
        #expect(error.isFinal && error.kind == .usage)
        #expect(error.message.contains("TLS") && error.message.contains("plaintext"), "\(error)")
        coordinator.summary.cancel()
    }

    @Test func theExecutablesTakeTheTLSFlags() throws {
        let certificates = try Self.certificates()
        let scratch = try Fixtures.scratch()
        let portFile = scratch + "/port"
        let coordinator = try Daemon.start("lora-ga-coord", [
            "--workers", "1", "--out", scratch + "/job", "--rank", "4", "--listen", "127.0.0.1:0", "--port-file", portFile,
            "--tls-cert", certificates + "/server.pem", "--tls-key", certificates + "/server.key",
        ], scratch: scratch)
        let port = try Daemon.port(from: portFile, of: coordinator)
        let plaintext = try Daemon.run("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", Fixtures.minilmWorkers[0], "--connect-timeout", "60"],
                                       scratch: scratch, timeout: .seconds(30))
        #expect(plaintext.status == 2 && plaintext.stderr.contains("requires TLS"), "\(plaintext)")
        let encrypted = try Daemon.run("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", Fixtures.minilmWorkers[0],
                                                          "--tls-ca", certificates + "/ca.pem"], scratch: scratch)
        #expect(encrypted.status == 0, "\(encrypted)")
        #expect(coordinator.wait() == 0, "\(coordinator.stderr)")
        #expect(coordinator.stderr.contains("(TLS)"))
        // The reverse: a TLS worker against a plaintext coordinator; both sides say so.
        let plainPortFile = scratch + "/plain-port"
        let plain = try Daemon.start("lora-ga-coord", ["--workers", "1", "--out", scratch + "/plain", "--listen", "127.0.0.1:0", "--port-file", plainPortFile],
                                     scratch: scratch)
        let plainPort = try Daemon.port(from: plainPortFile, of: plain)
        let tlsWorker = try Daemon.run("lora-ga-worker", ["--connect", "127.0.0.1:\(plainPort)", "--grads", Fixtures.minilmWorkers[0],
                                                          "--tls-ca", certificates + "/ca.pem", "--connect-timeout", "60"], scratch: scratch, timeout: .seconds(30))
        #expect(tlsWorker.status == 2 && tlsWorker.stderr.contains("plaintext"), "\(tlsWorker)")
        _ = try plain.waitForLog("a TLS client connected")
        plain.process.terminate()
        #expect(plain.wait() == 75)
        let halfConfigured = try Daemon.run("lora-ga-coord", ["--workers", "1", "--out", scratch + "/job2", "--tls-cert", certificates + "/server.pem"], scratch: scratch)
        #expect(halfConfigured.status == 2 && halfConfigured.stderr.contains("--tls-key"), "\(halfConfigured)")
    }
}
