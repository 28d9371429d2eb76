import LoRAGACore
#if canImport(Glibc)
import Glibc
#endif

/// One layer's accumulator on its way through the finalize thread, and its sum's memory on
/// the way back. A class so the accumulator has exactly one owner at each step (a copy
/// captured by a closure would make the memory's next user copy 940 MB first).
final class FinalizeJob: @unchecked Sendable {
    // The engine hands the job over before `run` and reads `spare` after it completes.
    private var accumulator: LayerAccumulator?
    private var spare: [Float]?
    let name: String
    typealias Outcome = Result<(factors: LoRAFactors, svd: TruncatedSVD, fidelityEstimate: Double?), Error>

    init(_ accumulator: consuming LayerAccumulator) {
        self.name = accumulator.name
        self.accumulator = accumulator
    }

    /// Runs on the finalize thread at nice 19. Receiving a layer keeps training nodes waiting,
    /// factoring one does not, so when they compete for cores receiving wins: measured from 2
    /// workers on one 2-core machine (EPYC), 16×4096² ingest 1.24-1.38 → 1.55-1.59 GB/s at
    /// nice 10 (nice 5: 1.43-1.48), 64×2048² 1.5 → 1.9 GB/s, the whole job as long as before
    /// (the window of open layers stops the workers until factoring catches up). On the Xeon,
    /// where factoring costs more against its memory bandwidth, nice 19 over 10: 64×2048²
    /// 1.05-1.28 → 1.23-1.34 GB/s, wall 4.5-5.6 → 3.8-4.9 s (8 alternating runs each). Linux
    /// keeps nice per thread; the thread is this job's alone.
    func run(settings: JobSettings) -> Outcome {
        #if os(Linux)
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 19)
        #endif
        var taken = accumulator.take()!
        defer { spare = taken.takeStorage() }
        return Result { try taken.finish(settings: settings) }
    }

    func takeSpare() -> [Float]? { spare.take() }
}
