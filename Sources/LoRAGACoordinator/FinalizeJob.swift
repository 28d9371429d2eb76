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
    /// factoring one does not, so when they compete for cores receiving wins (the window of
    /// open layers still stops the workers until factoring catches up). Linux keeps nice per
    /// thread; the thread is this job's alone.
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
