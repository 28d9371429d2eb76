import ArgumentParser
import COpenBLAS
import Foundation
import LoRAGACore
import LoRAGADaemon
#if canImport(Glibc)
import Glibc
#endif

/// `lora-ga-bench …`: measurements of this machine that Scripts/bench compares lora-ga's own
/// runs against. A separate executable, so the product CLI carries no benchmark code.
@main
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-ga-bench",
        abstract: "Measure this machine's limits for Scripts/bench.",
        subcommands: [Machine.self, ShardedGradients.self])

    static func main() {
        var command: any ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            exit(withError: error)
        }
        // The same OpenBLAS set-up as the lora-ga executables, before any BLAS call, so the
        // figures describe the kernels and threads they run with.
        if !String(reflecting: type(of: command)).hasPrefix("ArgumentParser."), let note = BLAS.setUpForThisProcess() {
            log("lora-ga-bench: \(note)")
        }
        do {
            try command.run()
        } catch {
            exit(withError: error)
        }
    }

    struct Machine: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "machine",
            abstract: "Single-thread sgemm GFLOP/s on the bench's shapes, summation and loopback TCP throughput.",
            discussion: """
                Uses lora-ga's own OpenBLAS with its own thread setting (one thread unless \
                OPENBLAS_NUM_THREADS says otherwise). For every shape OUTxIN and width k it times \
                G·X ([out×in]·[in×k], a range pass) and Gᵀ·Y ([in×out]·[out×k], a co-range pass); \
                then y += x on large vectors (the dense mode's summation) and a sender/receiver \
                pair of threads moving --loopback-mib MiB over 127.0.0.1 in --chunk-mib writes. \
                Prints one JSON object on stdout and a readable table on stderr.

                Example: lora-ga-bench machine --shapes 4096x11008 8192x28672 --k 32 128 --seconds 1
                """)

        @Option(parsing: .upToNextOption, help: "Layer shapes OUTxIN to time GEMMs on.")
        var shapes: [String] = ["4096x11008"]

        @Option(parsing: .upToNextOption, help: "Widths k of the thin operand.")
        var k: [Int] = [32, 64, 128]

        @Option(help: "Seconds spent timing each GEMM (after one warm-up call).")
        var seconds: Double = 1

        @Option(help: "MiB sent over loopback TCP (0 skips it).")
        var loopbackMib: Int = 2048

        @Option(help: "MiB per write() on loopback.")
        var chunkMib: Int = 4

        @Option(help: "Loopback transfers (the median is reported).")
        var loopbackRuns: Int = 3

        func validate() throws {
            _ = try parsedShapes()
            guard k.allSatisfy({ $0 > 0 }), seconds > 0, loopbackMib >= 0, chunkMib > 0, loopbackRuns > 0 else {
                throw ValidationError("--k, --seconds, --chunk-mib and --loopback-runs must be positive, --loopback-mib non-negative")
            }
        }

        func parsedShapes() throws -> [(rows: Int, cols: Int)] {
            try shapes.map { text in
                let parts = text.lowercased().split(separator: "x").compactMap { Int($0) }
                guard parts.count == 2, parts[0] > 0, parts[1] > 0 else {
                    throw ValidationError("--shapes '\(text)' is not OUTxIN with positive integers (e.g. 4096x11008)")
                }
                return (parts[0], parts[1])
            }
        }


    func run() throws {
            BLAS.configureThreads()
            var report = MachineReport(
                openblasThreads: Int(openblas_get_num_threads()),
                openblasHelperThreads: BLAS.helperThreadsRunning,
                openblasCore: String(cString: openblas_get_corename()),
                openblasCoreChosenByOpenBLAS: BLASKernels.selection.flatMap { $0.switched ? $0.chosenByOpenBLAS : nil },
                openblasConfig: String(cString: openblas_get_config()),
                environment: ["OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"].reduce(into: [:]) { values, name in
                    // lora-ga put these there itself (for its child processes): the user did not.
                    if name == "OPENBLAS_CORETYPE", BLASKernels.selection?.switched == true { return }
                    if name == "OPENBLAS_NUM_THREADS", BLAS.setThreadsEnvironment { return }
                    values[name] = ProcessInfo.processInfo.environment[name]
                })
            for (rows, cols) in try parsedShapes() {
                let g = Matrix.filled(rows: rows, cols: cols, seed: 1)
                for width in k {
                    let flops = 2.0 * Double(rows) * Double(cols) * Double(width)
                    let x = Matrix.filled(rows: cols, cols: width, seed: 2)
                    let y = Matrix.filled(rows: rows, cols: width, seed: 3)
                    let passes: [(String, () -> Void)] = [("G·X", { _ = Matrix.product(g, x) }), ("Gᵀ·Y", { _ = Matrix.product(g, y, transposeA: true) })]
                    for (operation, body) in passes {
                        let (repetitions, elapsed) = Self.time(for: seconds, body)
                        report.sgemm.append(.init(shape: "\(rows)x\(cols)", k: width, operation: operation, repetitions: repetitions,
                                                  seconds: elapsed, gflops: flops * Double(repetitions) / elapsed / 1e9))
                        log(String(format: "sgemm %@ %dx%d k=%d: %.1f GFLOP/s", operation, rows, cols, width, report.sgemm.last!.gflops))
                    }
                }
            }
            report.summation = Self.summation(floats: 64 << 20, seconds: seconds)
            log(String(format: "y += x (saxpy, %d floats): %.2f GB/s of x", report.summation.floats, report.summation.gbps))
            if loopbackMib > 0 {
                // Loopback varies from run to run (scheduling of the two threads on two cores): report the median.
                let runs = try (0..<loopbackRuns).map { _ in try Self.loopback(bytes: loopbackMib << 20, chunk: chunkMib << 20) }
                report.loopback = runs.sorted { $0.gbps < $1.gbps }[runs.count / 2]
                report.loopback!.runsGbps = runs.map(\.gbps)
                log(String(format: "loopback TCP: %.2f GB/s median of %d (%d MiB in %d MiB writes; %@)", report.loopback!.gbps, runs.count, loopbackMib, chunkMib,
                           runs.map { String(format: "%.2f", $0.gbps) }.joined(separator: ", ") as NSString))
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        }

        /// One warm-up call, then as many calls as fit in `seconds` (at least one).
        static func time(for seconds: Double, _ body: () -> Void) -> (repetitions: Int, seconds: Double) {
            body()
            let start = ContinuousClock.now
            var repetitions = 0
            var elapsed = 0.0
            repeat {
                body()
                repetitions += 1
                elapsed = (ContinuousClock.now - start).seconds
            } while elapsed < seconds
            return (repetitions, elapsed)
        }

        /// y += x with cblas_saxpy (Matrix.add): what the dense mode does per incoming row block.
        static func summation(floats: Int, seconds: Double) -> MachineReport.Summation {
            var y = Matrix.filled(rows: 1, cols: floats, seed: 4)
            let x = Matrix.filled(rows: 1, cols: floats, seed: 5)
            let (repetitions, elapsed) = time(for: seconds) { y.add(x) }
            return .init(floats: floats, seconds: elapsed, gbps: 4 * Double(floats) * Double(repetitions) / elapsed / 1e9)
        }

        /// A receiver thread reads until EOF while this thread writes `bytes` in `chunk`-sized writes.
        static func loopback(bytes: Int, chunk: Int) throws -> MachineReport.Loopback {
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard listener >= 0 else { throw BenchError("socket: \(String(cString: strerror(errno)))") }
            defer { close(listener) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { socketAddress in
                    bind(listener, socketAddress, length) == 0 && listen(listener, 1) == 0
                        && getsockname(listener, socketAddress, &length) == 0
                }
            }
            guard bound else { throw BenchError("bind/listen on 127.0.0.1: \(String(cString: strerror(errno)))") }

            let received = ReceivedBytes()
            let finished = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                let connection = accept(listener, nil, nil)
                var buffer = [UInt8](repeating: 0, count: chunk)
                var total = 0
                while connection >= 0 {
                    let count = buffer.withUnsafeMutableBytes { read(connection, $0.baseAddress, chunk) }
                    if count <= 0 { break }
                    total += count
                }
                if connection >= 0 { close(connection) }
                received.value = total
                finished.signal()
            }

            let sender = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            let connected = withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(sender, $0, length) == 0 }
            }
            guard sender >= 0, connected else { throw BenchError("connect to 127.0.0.1: \(String(cString: strerror(errno)))") }
            let payload = [UInt8](repeating: 0xA5, count: chunk)
            let start = ContinuousClock.now
            var sent = 0
            while sent < bytes {
                let count = payload.withUnsafeBytes { write(sender, $0.baseAddress, Swift.min(chunk, bytes - sent)) }
                guard count > 0 else { close(sender); throw BenchError("write: \(String(cString: strerror(errno)))") }
                sent += count
            }
            close(sender)
            finished.wait()
            let elapsed = (ContinuousClock.now - start).seconds
            guard received.value == bytes else { throw BenchError("loopback receiver got \(received.value) of \(bytes) bytes") }
            return .init(bytes: bytes, chunkBytes: chunk, seconds: elapsed, gbps: Double(bytes) / elapsed / 1e9)
        }
    }
}

/// What `lora-ga-bench machine` prints (snake_case keys, for Scripts/bench).
struct MachineReport: Encodable {
    struct GEMM: Encodable {
        var shape: String
        var k: Int
        var operation: String
        var repetitions: Int
        var seconds: Double
        var gflops: Double
    }
    struct Summation: Encodable {
        var floats: Int
        var seconds: Double
        var gbps: Double
    }
    struct Loopback: Encodable {
        var bytes: Int
        var chunkBytes: Int
        var seconds: Double
        var gbps: Double
        var runsGbps: [Double] = []
        enum CodingKeys: String, CodingKey { case bytes, chunkBytes = "chunk_bytes", seconds, gbps, runsGbps = "runs_gbps" }
    }
    var openblasThreads: Int
    /// Whether OpenBLAS's pool has helper threads alive while sgemm is timed (nil: this
    /// OpenBLAS does not say). They spin between calls, so with one thread there must be none.
    var openblasHelperThreads: Bool?
    var openblasCore: String
    /// The kernels OpenBLAS picked itself, when lora-ga replaced a generic fallback.
    var openblasCoreChosenByOpenBLAS: String?
    var openblasConfig: String
    var environment: [String: String]
    var sgemm: [GEMM] = []
    var summation = Summation(floats: 0, seconds: 0, gbps: 0)
    var loopback: Loopback?

    enum CodingKeys: String, CodingKey {
        case openblasThreads = "openblas_threads", openblasHelperThreads = "openblas_helper_threads", openblasCore = "openblas_core", openblasCoreChosenByOpenBLAS = "openblas_core_chosen_by_openblas", openblasConfig = "openblas_config"
        case environment, sgemm, summation, loopback
    }
}

private struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

private final class ReceivedBytes: @unchecked Sendable {
    var value = 0  // written by the receiver thread before it signals, read after the wait
}

private extension Matrix {
    /// Deterministic values in [-1, 1) without a random generator in the timed setup.
    static func filled(rows: Int, cols: Int, seed: UInt32) -> Matrix {
        var matrix = Matrix(rows: rows, cols: cols)
        matrix.storage.withUnsafeMutableBufferPointer { values in
            var state = seed &* 2_654_435_761
            for index in values.indices {
                state = state &* 1_664_525 &+ 1_013_904_223
                values[index] = Float(Int32(bitPattern: state) >> 8) * 0x1p-23
            }
        }
        return matrix
    }
}

/// Progress and diagnostics go to stderr so stdout stays parseable.
func log(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}
