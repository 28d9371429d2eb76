import LoRAGADaemon
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGAWire
import LoRAGAWorker

/// Faults and attacks that used to hang, crash or fool the coordinator, each reproduced with
/// real sockets, files or processes. The state-machine side of each rule is an event test in
/// `JobStateMachineTests`.
@Suite(.serialized) struct HardeningTests {
    /// Log lines the coordinator wrote, for tests that check what it said.
    final class LogCapture: LogHandler, @unchecked Sendable {
        private let lines = NIOLockedValueBox<[String]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
            lines.withLockedValue { $0.append("\(level): \(message)") }
        }
        var all: [String] { lines.withLockedValue { $0 } }
    }

    static func options(_ out: String, workers: Int = 2, mode: SVDMode = .dense) -> CoordinatorOptions {
        var options = CoordinatorOptions(settings: JobSettings(lora: LoRAConfiguration(rank: 4, alpha: 8), mode: mode), expectedWorkers: workers, outputDirectory: out)
        options.gatherTimeout = .seconds(60)
        options.rejoinTimeout = .seconds(20)
        return options
    }

    /// Runs a coordinator on port 0 and `body` with its port; returns the job's result.
    static func job(_ options: CoordinatorOptions, logger: Logger = DistributedJobTests.quiet,
                    _ body: @escaping @Sendable (Int, CoordinatorEngine) async -> Void) async -> Result<CoordinatorSummary, Error> {
        let server = CoordinatorServer(host: "127.0.0.1", port: 0, options: options, logger: logger)
        let (ports, continuation) = AsyncStream<(Int, CoordinatorEngine)>.makeStream()
        async let summary = server.run { port, engine in continuation.yield((port, engine)) }
        var iterator = ports.makeAsyncIterator()
        if let (port, engine) = await iterator.next() { await body(port, engine) }
        do { return .success(try await summary) } catch { return .failure(error) }
    }

    static func worker(_ id: String, port: Int, paths: [String], timeout: Duration = .seconds(10)) async -> Result<WorkerSummary, Error> {
        var options = WorkerOptions(host: "127.0.0.1", port: port, id: id, gradientPaths: paths)
        options.connectTimeout = timeout
        do { return .success(try await WorkerClient(options: options, logger: DistributedJobTests.quiet).run()) } catch { return .failure(error) }
    }

    static func workers(port: Int, _ shares: [String] = Fixtures.minilmWorkers) async -> [Result<WorkerSummary, Error>] {
        await withTaskGroup(of: (Int, Result<WorkerSummary, Error>).self) { group in
            for (index, share) in shares.enumerated() {
                group.addTask { (index, await worker("w\(index)", port: port, paths: [share])) }
            }
            var results: [Int: Result<WorkerSummary, Error>] = [:]
            for await (index, result) in group { results[index] = result }
            return shares.indices.map { results[$0]! }
        }
    }

    // MARK: - The last write

    /// The adapter cannot be written (here: its file name is taken by a directory, as a full
    /// disk would fail the write): the job fails with that reason and every worker is told,
    /// instead of everyone waiting forever.
    @Test func failingToWriteTheAdapterFailsTheJobAndReleasesTheWorkers() async throws {
        let out = try Fixtures.scratch("adapter-fails")
        try FileManager.default.createDirectory(atPath: out + "/" + PEFTAdapter.weightsFileName, withIntermediateDirectories: true)
        let workers = NIOLockedValueBox<[Result<WorkerSummary, Error>]>([])
        let started = ContinuousClock.now
        let result = await Self.job(Self.options(out)) { port, _ in
            Task {
                let done = await Self.workers(port: port)
                workers.withLockedValue { $0 = done }
            }
        }
        guard case .failure(let error as JobError) = result else { Issue.record("the job did not fail: \(result)"); return }
        #expect(error.message.contains("writing the adapter"), "\(error)")
        #expect(ContinuousClock.now - started < .seconds(60))
        // Every layer was checkpointed before the write failed: a rerun resumes from them.
        let manifest = try #require(CheckpointStore.existingManifest(in: out))
        #expect(manifest.finished.count == 12)
        for _ in 0..<200 where workers.withLockedValue({ $0.count }) < 2 { try await Task.sleep(for: .milliseconds(50)) }
        for outcome in workers.withLockedValue({ $0 }) {
            guard case .failure(let workerError) = outcome else { Issue.record("a worker finished: \(outcome)"); continue }
            #expect("\(workerError)".contains("writing the adapter"), "\(workerError)")
        }
    }

    // MARK: - Before authentication

    /// Before its Hello is accepted a connection may send only a small Hello: a large frame
    /// header is refused from its length alone, so nothing near 64 MiB is ever buffered.
    @Test func aLargeFrameBeforeTheHandshakeIsRefusedAtOnce() async throws {
        let result = await Self.job(Self.options(try Fixtures.scratch("preauth"), workers: 1)) { port, engine in
            let answer = await Self.rawExchange(port: port) { outbound in
                var bytes = ByteBuffer()
                bytes.writeInteger(UInt32(32 << 20), endianness: .little)   // a 32 MiB "Announce"
                bytes.writeInteger(WireMessageType.announce.rawValue)
                bytes.writeBytes([UInt8](repeating: 0, count: 1024))
                try await outbound.write(bytes)
            }
            #expect(answer.contains("exceeds the limit of \(HandshakeGate.handshakeMaxFrameLength) bytes"), "\(answer)")
            _ = await Self.worker("w0", port: port, paths: [Fixtures.minilmWorkers[0]])
            _ = engine
        }
        #expect(try result.get().layers == 12)
    }

    /// Connections that never say anything are closed after the handshake timeout; beyond the
    /// cap, new ones are refused at once; real workers still join and finish.
    @Test func silentConnectionsAreClosedAndCappedAndRealWorkersStillJoin() async throws {
        var options = Self.options(try Fixtures.scratch("silent"))
        options.handshakeTimeout = .milliseconds(700)
        options.maxPendingConnections = 4
        let result = await Self.job(options) { port, _ in
            // Six silent connections: the last two are over the cap.
            let silent = await withTaskGroup(of: String.self) { group in
                for _ in 0..<6 { group.addTask { await Self.rawExchange(port: port) { _ in } } }
                return await group.reduce(into: [String]()) { $0.append($1) }
            }
            #expect(silent.filter { $0.contains("did not finish within") }.count == 4, "\(silent)")
            #expect(silent.filter { $0.contains("too many connections in their handshake") }.count == 2, "\(silent)")
            let done = await Self.workers(port: port)
            #expect(done.allSatisfy { if case .success = $0 { true } else { false } }, "\(done)")
        }
        #expect(try result.get().layers == 12)
    }

    /// Without a secret, connections that only greet take no slot: real workers still join.
    @Test func greetingOnlyConnectionsCannotSquatWorkerSlots() async throws {
        let result = await Self.job(Self.options(try Fixtures.scratch("squat"))) { port, _ in
            // Three connections greet correctly, then hold on without announcing.
            let squatters = (0..<3).map { index in
                Task {
                    let channel = try await Fixtures.wireConnection(port: port)
                    try await channel.executeThenClose { inbound, outbound in
                        var messages = inbound.makeAsyncIterator()
                        _ = try await messages.next()
                        try await outbound.write(.hello(Hello(workerID: "squatter\(index)", sessionNonce: 1)))
                        while try await messages.next() != nil {}
                    }
                }
            }
            try? await Task.sleep(for: .milliseconds(300))
            let done = await Self.workers(port: port)
            #expect(done.allSatisfy { if case .success = $0 { true } else { false } }, "\(done)")
            for squatter in squatters { _ = await squatter.result }
        }
        #expect(try result.get().layers == 12)
    }

    // MARK: - Workers that cannot take part

    /// A worker whose gradient path is not a safetensors file tells the coordinator why; the
    /// job fails at once with that reason instead of waiting out its gather timeout.
    @Test func aWorkerWithUnreadableFilesFailsTheJobAtOnceWithItsReason() async throws {
        let bad = try Fixtures.scratch("unreadable")
        try "not a gradient\n".write(toFile: bad + "/grads.safetensors", atomically: true, encoding: .utf8)
        let started = ContinuousClock.now
        let result = await Self.job(Self.options(try Fixtures.scratch("unreadable-out"))) { port, _ in
            _ = await Self.workers(port: port, [Fixtures.minilmWorkers[0], bad])
        }
        guard case .failure(let error as JobError) = result else { Issue.record("the job did not fail: \(result)"); return }
        #expect(error.kind == .badInput)
        #expect(error.message.contains("worker 'w1' cannot take part") && error.message.contains("not a safetensors file"), "\(error)")
        #expect(ContinuousClock.now - started < .seconds(30))
    }

    /// A worker that stops sending while it owes a layer (frozen, SIGSTOP) is named in a
    /// warning with what it still owes.
    @Test func aSilentWorkerIsNamedWithWhatItOwes() async throws {
        var options = Self.options(try Fixtures.scratch("stall"), workers: 2)
        options.stallWarning = .milliseconds(500)
        options.rejoinTimeout = .seconds(1)
        let capture = LogCapture()
        let logger = Logger(label: "test", factory: { _ in capture })
        let result = await Self.job(options, logger: logger) { port, _ in
            // "frozen" greets and announces the job's layers, then says nothing more.
            let frozen = try! await Fixtures.wireConnection(port: port)
            let layers = try! GradientFileSet(paths: [Fixtures.minilmWorkers[0]]).layers
            Task {
                try? await frozen.executeThenClose { inbound, outbound in
                    var messages = inbound.makeAsyncIterator()
                    _ = try await messages.next()
                    try await outbound.write(.hello(Hello(workerID: "frozen", sessionNonce: 1)))
                    _ = try await messages.next()
                    try await outbound.write(.announce(Announce(layers: layers.map { LayerInfo(name: $0.name, rows: UInt64($0.rows), cols: UInt64($0.cols), sourceDType: .bf16) })))
                    while try await messages.next() != nil {}
                }
            }
            Task { _ = await Self.worker("w1", port: port, paths: [Fixtures.minilmWorkers[1]]) }
            for _ in 0..<100 where !capture.all.contains(where: { $0.contains("worker 'frozen' has sent nothing") }) {
                try? await Task.sleep(for: .milliseconds(100))
            }
            try? await frozen.channel.close()
        }
        let warning = capture.all.first { $0.contains("worker 'frozen' has sent nothing") }
        #expect(warning?.contains("it still owes rows 0..<") == true, "\(capture.all.suffix(5))")
        _ = result
    }

    // MARK: - The output directory

    /// A second coordinator (or `init`) on an output directory in use is refused, naming the
    /// holder; once the holder is gone (even killed), the directory can be taken.
    @Test func theOutputDirectoryIsLockedAndAStaleLockIsTakenOver() throws {
        let out = try Fixtures.scratch("lock")
        do {
            let first = try OutputLock(directory: out, purpose: "first")
            let error = #expect(throws: OutputLockError.self) { try OutputLock(directory: out, purpose: "second") }
            #expect(error?.description.contains("pid \(getpid())") == true, "\(String(describing: error))")
            #expect(throws: OutputLockError.self) {
                _ = try LocalJob(files: GradientFileSet(paths: Fixtures.minilmWorkers), settings: JobSettings(lora: LoRAConfiguration(rank: 4, alpha: 8), mode: .dense), outputDirectory: out)
            }
            withExtendedLifetime(first) {}
        }
        // Held by another process that then dies (SIGKILL): the kernel drops its lock.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        holder.arguments = [out + "/" + OutputLock.fileName, "sleep", "30"]
        try holder.run()
        Thread.sleep(forTimeInterval: 0.3)
        #expect(throws: OutputLockError.self) { try OutputLock(directory: out, purpose: "while held") }
        kill(holder.processIdentifier, SIGKILL)
        holder.waitUntilExit()
        Thread.sleep(forTimeInterval: 0.2)
        _ = try OutputLock(directory: out, purpose: "after the holder died")
    }

    // MARK: - Checkpoint identity

    /// Swapped checkpoints pass their own CRC but not the manifest's identity check: inspect
    /// reports both, export leaves them out, and a resumed job recomputes them.
    @Test func swappedCheckpointsAreDetectedAndRecomputed() throws {
        let out = try Fixtures.scratch("swap")
        let settings = JobSettings(lora: LoRAConfiguration(rank: 4, alpha: 8), mode: .dense)
        let files = try GradientFileSet(paths: Fixtures.minilmWorkers)
        _ = try LocalJob(files: files, settings: settings, outputDirectory: out).run()
        let checkpoints = out + "/checkpoints/"
        try FileManager.default.moveItem(atPath: checkpoints + "0000.ckpt", toPath: checkpoints + "swap.tmp")
        try FileManager.default.moveItem(atPath: checkpoints + "0001.ckpt", toPath: checkpoints + "0000.ckpt")
        try FileManager.default.moveItem(atPath: checkpoints + "swap.tmp", toPath: checkpoints + "0001.ckpt")
        let inspection = try CheckpointInspection(directory: out)
        #expect(inspection.layers.filter { $0.state == .corrupt }.map(\.index) == [0, 1])
        #expect(inspection.layers[0].detail?.contains("differs from the manifest") == true, "\(String(describing: inspection.layers[0].detail))")
        #expect(inspection.intact.count == 10)
        let job = try LocalJob(files: files, settings: settings, outputDirectory: out)
        #expect(Set(job.store.droppedLayers) == Set(files.layers.prefix(2).map(\.name)))
        _ = try job.run()
        withExtendedLifetime(job) {}
        let results = try AdapterVerifier(files: files, adapterDirectory: out, plantedSpectrumPaths: []).verify()
        #expect(results.count == 12 && results.allSatisfy { $0.ratio <= 1.01 })
        // A checkpoint copied over another layer's name, with the manifest's CRC rewritten to
        // match, is still refused: it names another layer.
        let manifestPath = checkpoints + CheckpointStore.manifestFileName
        try FileManager.default.removeItem(atPath: checkpoints + "0001.ckpt")
        try FileManager.default.copyItem(atPath: checkpoints + "0000.ckpt", toPath: checkpoints + "0001.ckpt")
        var manifest = try JSONDecoder().decode(JobManifest.self, from: Data(contentsOf: URL(fileURLWithPath: manifestPath)))
        manifest.finished[files.layers[1].name]!.crc32c = CheckpointStore.contentChecksum(of: checkpoints + "0001.ckpt")
        try JSONEncoder().encode(manifest).write(to: URL(fileURLWithPath: manifestPath))
        let second = try CheckpointInspection(directory: out)
        #expect(second.layers[1].state == .corrupt && second.layers[1].detail?.contains("holds layer") == true, "\(String(describing: second.layers[1].detail))")
    }

    // MARK: - Determinism

    /// Power mode (the default) sums replies in worker-id order: three workers give the same
    /// bytes run after run. (Dense and sketch fold shards in arrival order; with three or more
    /// workers their factors agree to float rounding, not bit for bit: see the README.)
    @Test func threePowerWorkersGiveByteIdenticalAdaptersRunAfterRun() async throws {
        var adapters: [Data] = []
        for run in 0..<2 {
            let out = try Fixtures.scratch("determinism-\(run)")
            let result = await Self.job(Self.options(out, workers: 3, mode: .power)) { port, _ in
                _ = await Self.workers(port: port, Fixtures.minilmWorkers + [Fixtures.minilmWorkers[0]])
            }
            #expect(try result.get().layers == 12)
            adapters.append(try Data(contentsOf: URL(fileURLWithPath: out + "/" + PEFTAdapter.weightsFileName)))
        }
        #expect(adapters[0] == adapters[1])
    }

    /// Out of file descriptors: the coordinator says so once (not once per failed accept, and
    /// without spinning on it), closes the idle connections after its handshake timeout, and
    /// real workers then join and finish.
    @Test func runningOutOfFileDescriptorsIsSaidOnceAndTheJobStillFinishes() throws {
        let bin = FaultDrillTests.binaries
        let work = try Fixtures.scratch("fd-limit")
        let log = work + "/coord.log"
        FileManager.default.createFile(atPath: log, contents: nil)
        let coord = Process()
        coord.executableURL = URL(fileURLWithPath: "/bin/bash")
        coord.arguments = ["-c", "ulimit -n 40; exec \"$0\" \"$@\"", bin.appendingPathComponent("lora-ga-coord").path,
                           "--listen", "127.0.0.1:0", "--port-file", work + "/port", "--workers", "2", "--out", work + "/out",
                           "--handshake-timeout", "1", "--mode", "dense"]
        coord.standardError = FileHandle(forWritingAtPath: log)
        try coord.run()
        var port = 0
        for _ in 0..<250 where port == 0 {
            Thread.sleep(forTimeInterval: 0.02)
            port = Int(((try? String(contentsOfFile: work + "/port", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        }
        try #require(port > 0, "the coordinator never listened")
        // 60 silent connections: more than the coordinator's 40 descriptors can hold.
        var sockets: [Int32] = []
        for _ in 0..<60 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let connected = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            if connected == 0 { sockets.append(fd) } else { close(fd) }
        }
        Thread.sleep(forTimeInterval: 2.5)
        for fd in sockets { close(fd) }
        let workers = try Fixtures.minilmWorkers.enumerated().map { index, grads in
            let worker = Process()
            worker.executableURL = bin.appendingPathComponent("lora-ga-worker")
            worker.arguments = ["--connect", "127.0.0.1:\(port)", "--grads", grads, "--id", "w\(index)", "--connect-timeout", "60"]
            worker.standardError = FileHandle(forWritingAtPath: "/dev/null")
            try worker.run()
            return worker
        }
        for worker in workers { worker.waitUntilExit() }
        coord.waitUntilExit()
        let text = try String(contentsOfFile: log, encoding: .utf8)
        #expect(text.components(separatedBy: "out of file descriptors").count - 1 == 1, "\(text.suffix(2000))")
        #expect(coord.terminationStatus == 0, "\(text.suffix(2000))")
        #expect(workers.allSatisfy { $0.terminationStatus == 0 })
    }

    // MARK: - Signals

    /// What `scancel` and a Kubernetes preemption do: SIGTERM to the coordinator and its
    /// workers at the same moment, many times. The coordinator must exit with the documented
    /// "interrupted, resumable" status (75) every time, never crash on a signal.
    @Test func simultaneousSIGTERMToCoordinatorAndWorkersEndsResumableEveryTime() throws {
        let bin = FaultDrillTests.binaries
        let coordinator = bin.appendingPathComponent("lora-ga-coord").path
        try #require(FileManager.default.isExecutableFile(atPath: coordinator), "build the executables first (swift build): \(coordinator) is missing")
        var statuses: [String] = []
        for run in 0..<8 {
            let work = try Fixtures.scratch("sigterm-\(run)")
            let coord = Process()
            coord.executableURL = URL(fileURLWithPath: coordinator)
            coord.arguments = ["--listen", "127.0.0.1:0", "--port-file", work + "/port", "--workers", "2", "--out", work + "/out", "--mode", run % 2 == 0 ? "dense" : "power"]
            coord.standardError = FileHandle(forWritingAtPath: "/dev/null")
            try coord.run()
            var port = ""
            for _ in 0..<200 where port.isEmpty {
                Thread.sleep(forTimeInterval: 0.02)
                port = ((try? String(contentsOfFile: work + "/port", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            }
            try #require(!port.isEmpty, "the coordinator never listened")
            let workers = try Fixtures.minilmWorkers.enumerated().map { index, grads in
                let worker = Process()
                worker.executableURL = bin.appendingPathComponent("lora-ga-worker")
                worker.arguments = ["--connect", "127.0.0.1:\(port)", "--grads", grads, "--id", "w\(index)"]
                worker.standardError = FileHandle(forWritingAtPath: "/dev/null")
                try worker.run()
                return worker
            }
            // Mid-job, at a different moment each run.
            Thread.sleep(forTimeInterval: 0.05 + 0.1 * Double(run))
            for process in [coord] + workers { kill(process.processIdentifier, SIGTERM) }
            for process in [coord] + workers { process.waitUntilExit() }
            statuses.append("\(coord.terminationReason == .exit ? "exit" : "signal") \(coord.terminationStatus)")
        }
        #expect(statuses.allSatisfy { $0 == "exit 75" }, "\(statuses)")
    }

    // MARK: - Helpers

    /// Connects with raw bytes, runs `send`, and describes what the coordinator answered.
    static func rawExchange(port: Int, _ send: @escaping @Sendable (NIOAsyncChannelOutboundWriter<ByteBuffer>) async throws -> Void) async -> String {
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder()))
                        return try NIOAsyncChannel<WireMessage, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
            let watchdog = Task {
                try await Task.sleep(for: .seconds(20))
                try await channel.channel.close()
            }
            defer { watchdog.cancel() }
            return try await channel.executeThenClose { inbound, outbound in
                try await send(outbound)
                var seen: [String] = []
                for try await message in inbound {
                    if case .error(let error) = message { seen.append("error: \(error.message)") } else { seen.append("\(message.type)") }
                }
                return seen.joined(separator: ", ") + ", closed"
            }
        } catch {
            return "failed: \(error)"
        }
    }
}

/// Gradient paths that are not what they should be get errors that say exactly that.
@Suite struct GradientPathTests {
    @Test func anEmptyDirectoryIsAnErrorNotSilentlySkipped() throws {
        let empty = try Fixtures.scratch("empty-grads")
        let error = #expect(throws: (any Error).self) { _ = try GradientFileSet(paths: [Fixtures.minilmWorkers[0], empty]) }
        #expect("\(error!)".contains("\(empty): the directory holds no .safetensors files"), "\(error!)")
    }

    @Test func aTextFileIsNamedAsNotASafetensorsFile() throws {
        let dir = try Fixtures.scratch("text-grads")
        try "step,loss\n1,0.5\n".write(toFile: dir + "/grads.safetensors", atomically: true, encoding: .utf8)
        let error = #expect(throws: (any Error).self) { _ = try GradientFileSet(paths: [dir]) }
        #expect("\(error!)".contains("not a safetensors file"), "\(error!)")
    }
}
