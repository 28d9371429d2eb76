import Foundation
import Testing
import LoRAGAFormats

/// The executables as an operator meets them: documented exit statuses, metrics while a job
/// runs and in a file at exit, strict settings, log formats. Real processes on loopback.
@Suite(.serialized) struct OperationsTests {
    /// A port nothing listens on (bound, then released).
    static func deadPort() throws -> Int {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(descriptor) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, length) == 0 && getsockname(descriptor, $0, &length) == 0 }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// One F32 gradient file of two small layers; `nanRow` puts a NaN in the second.
    static func gradients(_ directory: String, nanRow: Int? = nil) throws -> String {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var state: UInt32 = 12345
        func values(_ count: Int) -> [Float] {
            (0..<count).map { _ in
                state = state &* 1_664_525 &+ 1_013_904_223
                return Float(Int32(bitPattern: state) >> 8) * 0x1p-23
            }
        }
        var second = values(96 * 48)
        if let nanRow { second[nanRow * 48 + 7] = .nan }
        try SafeTensorsWriter.write(path: directory + "/grads.safetensors", tensors: [
            (.init(name: "model.layers.0.q_proj.weight", dtype: .f32, shape: [64, 32]), values(64 * 32)),
            (.init(name: "model.layers.0.v_proj.weight", dtype: .f32, shape: [96, 48]), second),
        ])
        return directory
    }

    // MARK: - 2: usage and configuration

    @Test func usageAndConfigurationErrorsExit2NamingTheClosestSetting() throws {
        let scratch = try Fixtures.scratch()
        let typo = try Daemon.run("lora-ga-coord", ["--workers", "1", "--out", scratch + "/o", "--rnak", "8"], scratch: scratch)
        #expect(typo.status == 2 && typo.stderr.contains("did you mean --rank?"), "\(typo)")

        let config = scratch + "/coordinator.json"
        try #"{"workers": 1, "out": "/tmp/never", "rnak": 16}"#.write(toFile: config, atomically: true, encoding: .utf8)
        let file = try Daemon.run("lora-ga-coord", ["--config", config], scratch: scratch)
        #expect(file.status == 2 && file.stderr.contains("unknown key 'rnak'") && file.stderr.contains("'rank'"), "\(file)")

        let environment = try Daemon.run("lora-ga-worker", ["--grads", scratch], environment: ["LORA_GA_CONECT_TIMEOUT": "3"], scratch: scratch)
        #expect(environment.status == 2 && environment.stderr.contains("LORA_GA_CONNECT_TIMEOUT"), "\(environment)")

        let format = try Daemon.run("lora-ga-worker", ["--grads", scratch, "--log-format", "xml"], scratch: scratch)
        #expect(format.status == 2 && format.stderr.contains("log-format"), "\(format)")

        let missing = try Daemon.run("lora-ga-coord", ["--out", scratch + "/o"], scratch: scratch)
        #expect(missing.status == 2 && missing.stderr.contains("LORA_GA_WORKERS"), "\(missing)")

        let cli = try Daemon.run("lora-ga", ["init", "--rnak", "8", "--out", scratch + "/o", scratch], scratch: scratch)
        #expect(cli.status == 2, "\(cli)")
        let level = try Daemon.run("lora-ga", ["init", "--log-level", "loud", "--out", scratch + "/o", scratch], scratch: scratch)
        #expect(level.status == 2, "\(level)")

        for executable in ["lora-ga", "lora-ga-coord", "lora-ga-worker"] {
            let help = try Daemon.start(executable, ["--help"], scratch: scratch)
            #expect(help.wait() == 0)
        }
    }

    @Test func everyExecutableDocumentsTheExitStatusesInItsHelp() throws {
        for executable in ["lora-ga", "lora-ga-coord", "lora-ga-worker"] {
            let binary = FaultDrillTests.binaries.appendingPathComponent(executable).path
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["--help"]
            let output = Pipe()
            process.standardOutput = output
            try process.run()
            let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            #expect(process.terminationStatus == 0)
            for line in ["EXIT STATUS", "  2   usage", "  3   bad input", "  4   authentication", "  75  interrupted"] {
                #expect(text.contains(line), "\(executable) --help lacks '\(line)'")
            }
            if executable != "lora-ga" {
                #expect(text.contains("--log-format") && text.contains("--metrics-listen") && text.contains("LORA_GA_METRICS_FILE"), "\(executable)")
            }
        }
    }

    // MARK: - 3: bad input

    @Test func badInputExits3() throws {
        let scratch = try Fixtures.scratch()
        let poisoned = try Self.gradients(scratch + "/nan", nanRow: 5)
        let local = try Daemon.run("lora-ga", ["init", "--rank", "2", "--mode", "dense", "--out", scratch + "/init", poisoned], scratch: scratch)
        #expect(local.status == 3 && local.stderr.contains("NaN"), "\(local)")

        try FileManager.default.createDirectory(atPath: scratch + "/garbage", withIntermediateDirectories: true)
        try Data("this is not a safetensors file".utf8).write(to: URL(fileURLWithPath: scratch + "/garbage/grads.safetensors"))
        let malformed = try Daemon.run("lora-ga", ["init", "--rank", "2", "--out", scratch + "/init2", scratch + "/garbage"], scratch: scratch)
        #expect(malformed.status == 3, "\(malformed)")

        // Distributed: the worker finds the NaN, tells the coordinator, and both exit 3.
        let portFile = scratch + "/port"
        let coordinator = try Daemon.start("lora-ga-coord", ["--workers", "1", "--out", scratch + "/job", "--rank", "2", "--mode", "dense",
                                                             "--listen", "127.0.0.1:0", "--port-file", portFile], scratch: scratch)
        let port = try Daemon.port(from: portFile, of: coordinator)
        let worker = try Daemon.run("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", poisoned, "--connect-timeout", "10"], scratch: scratch)
        #expect(worker.status == 3 && worker.stderr.contains("NaN"), "\(worker)")
        #expect(coordinator.wait(timeout: .seconds(30)) == 3, "\(coordinator.stderr)")
    }

    // MARK: - 4, 75 and 1

    @Test func wrongSecretExits4AndATerminatedCoordinatorExits75() throws {
        let scratch = try Fixtures.scratch()
        try "the coordinator's own secret 0123456789".write(toFile: scratch + "/secret", atomically: true, encoding: .utf8)
        try "somebody else's secret 9876543210".write(toFile: scratch + "/wrong", atomically: true, encoding: .utf8)
        let portFile = scratch + "/port"
        let coordinator = try Daemon.start("lora-ga-coord", ["--workers", "1", "--out", scratch + "/job", "--listen", "127.0.0.1:0",
                                                             "--port-file", portFile, "--secret-file", scratch + "/secret"], scratch: scratch)
        let port = try Daemon.port(from: portFile, of: coordinator)
        let worker = try Daemon.run("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", Fixtures.minilmWorkers[0],
                                                       "--secret-file", scratch + "/wrong", "--connect-timeout", "10"], scratch: scratch)
        #expect(worker.status == 4 && worker.stderr.contains("authentication failed"), "\(worker)")
        coordinator.process.terminate()   // SIGTERM while it waits for workers
        #expect(coordinator.wait(timeout: .seconds(30)) == 75, "\(coordinator.stderr)")
    }

    @Test func workerExits75WhenTerminatedOrWhenTheCoordinatorStaysAway() throws {
        let scratch = try Fixtures.scratch()
        let port = try Self.deadPort()
        let started = ContinuousClock.now
        let gone = try Daemon.run("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", Fixtures.minilmWorkers[0],
                                                     "--connect-timeout", "1", "--log-format", "json"], scratch: scratch)
        #expect(gone.status == 75, "\(gone)")
        #expect(ContinuousClock.now - started < .seconds(30))
        // --log-format json: every line is one JSON object with a level and a message.
        let lines = gone.stderr.split(separator: "\n")
        #expect(!lines.isEmpty)
        for line in lines {
            let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String]
            #expect(object?["level"] != nil && object?["msg"] != nil, "\(line)")
        }

        let waiting = try Daemon.start("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", Fixtures.minilmWorkers[0],
                                                          "--connect-timeout", "120"], scratch: scratch)
        _ = try waiting.waitForLog("not reachable")
        waiting.process.terminate()
        #expect(waiting.wait(timeout: .seconds(30)) == 75, "\(waiting.stderr)")
    }

    @Test func otherFailuresExit1() throws {
        let scratch = try Fixtures.scratch()
        let lonely = try Daemon.run("lora-ga-coord", ["--workers", "1", "--out", scratch + "/job", "--listen", "127.0.0.1:0", "--gather-timeout", "0.5"], scratch: scratch)
        #expect(lonely.status == 1 && lonely.stderr.contains("workers joined within"), "\(lonely)")
    }

    // MARK: - Metrics

    @Test func metricsAreServedWhileTheJobRunsAndLeftInTheFileAtExit() throws {
        let scratch = try Fixtures.scratch()
        let portFile = scratch + "/port"
        let coordinatorFile = scratch + "/coordinator.prom", workerFile = scratch + "/worker0.prom"
        let coordinator = try Daemon.start("lora-ga-coord", [
            "--workers", "2", "--out", scratch + "/job", "--rank", "4", "--mode", "power", "--listen", "127.0.0.1:0", "--port-file", portFile,
            "--metrics-listen", "127.0.0.1:0", "--metrics-file", coordinatorFile,
        ], scratch: scratch)
        let port = try Daemon.port(from: portFile, of: coordinator)
        let metricsPort = try #require(Int(try coordinator.waitForLog(#"metrics at http://127\.0\.0\.1:(\d+)/metrics"#)))

        let first = try httpGet(port: metricsPort)
        #expect(first.status == 200)
        #expect(metricValue(first.body, "lora_ga_workers_connected") == 0, "\(first.body)")
        #expect((metricValue(first.body, "lora_ga_resident_memory_bytes") ?? 0) > 1e6, "\(first.body)")
        #expect(try httpGet(port: metricsPort, path: "/other").status == 404)

        let worker0 = try Daemon.start("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", Fixtures.minilmWorkers[0], "--id", "w0",
                                                          "--metrics-listen", "127.0.0.1:0", "--metrics-file", workerFile], scratch: scratch)
        let workerMetricsPort = try #require(Int(try worker0.waitForLog(#"metrics at http://127\.0\.0\.1:(\d+)/metrics"#)))
        // The job runs (one worker in, one to come): the scrape shows it.
        var connected: Double?
        let deadline = ContinuousClock.now + .seconds(30)
        while connected != 1, ContinuousClock.now < deadline {
            connected = metricValue(try httpGet(port: metricsPort).body, "lora_ga_workers_connected")
            Thread.sleep(forTimeInterval: 0.05)
        }
        #expect(connected == 1)
        let workerScrape = try httpGet(port: workerMetricsPort)
        #expect(workerScrape.status == 200 && metricValue(workerScrape.body, "lora_ga_worker_reconnects_total") == 0, "\(workerScrape.body)")

        let worker1 = try Daemon.start("lora-ga-worker", ["--connect", "127.0.0.1:\(port)", "--grads", Fixtures.minilmWorkers[1], "--id", "w1"], scratch: scratch)
        #expect(coordinator.wait() == 0, "\(coordinator.stderr)")
        #expect(worker0.wait() == 0 && worker1.wait() == 0, "\(worker0.stderr)\n\(worker1.stderr)")
        #expect(coordinator.stderr.contains("[12/12]") && coordinator.stderr.contains("ETA"), "\(coordinator.stderr)")

        let final = try String(contentsOfFile: coordinatorFile, encoding: .utf8)
        #expect(metricValue(final, "lora_ga_layers_total") == 12, "\(final)")
        #expect(metricValue(final, "lora_ga_layers_done") == 12, "\(final)")
        #expect(metricValue(final, "lora_ga_layer_seconds_count") == 12, "\(final)")
        #expect((metricValue(final, "lora_ga_received_bytes_total") ?? 0) > 0, "\(final)")
        #expect(final.contains("# TYPE lora_ga_layer_seconds histogram") && final.contains("# HELP lora_ga_layers_done"), "\(final)")
        let workerFinal = try String(contentsOfFile: workerFile, encoding: .utf8)
        #expect((metricValue(workerFinal, "lora_ga_worker_sent_bytes_total") ?? 0) > 0, "\(workerFinal)")
        #expect((metricValue(workerFinal, "lora_ga_worker_rows_total") ?? 0) > 0, "\(workerFinal)")
        #expect((metricValue(workerFinal, "lora_ga_resident_memory_bytes") ?? 0) > 1e6, "\(workerFinal)")
    }
}
