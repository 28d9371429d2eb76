import COpenBLAS
import LoRAGACore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Process set-up of OpenBLAS, done by each executable before its first BLAS call: kernel
/// choice, thread count, no spinning helper threads. It lives here, with the other per-process
/// concerns, so that LoRAGACore only computes.
extension BLAS {
    /// One OpenBLAS thread per process: on 2-core machines a second thread is no faster
    /// and competes with our own I/O and network threads. `OPENBLAS_NUM_THREADS` overrides.
    ///
    /// Only when the count changes: OpenBLAS 0.3.21 restarts its thread pool in any
    /// `openblas_set_num_threads` after `stopHelperThreads` shut it down, and the new helper
    /// spins on sched_yield for the whole run.
    public static func configureThreads() {
        var count: Int32 = 1
        if let text = getenvString("OPENBLAS_NUM_THREADS"), let asked = Int32(text), asked > 0 { count = asked }
        guard openblas_get_num_threads() != count else { return }
        openblas_set_num_threads(count)
    }

    private static let threadSettingIsOurs = Mutex(false)

    /// Whether OpenBLAS's thread pool has helper threads alive; nil when this BLAS does not
    /// export its `blas_server_avail` / `blas_num_threads` (another build or library).
    public static var helperThreadsRunning: Bool? {
        guard let handle = dlopen(nil, RTLD_NOW), let available = dlsym(handle, "blas_server_avail"),
              let threads = dlsym(handle, "blas_num_threads") else { return nil }
        return available.load(as: Int32.self) != 0 && threads.load(as: Int32.self) > 1
    }

    /// Whether OPENBLAS_NUM_THREADS in this process's environment was set by `stopHelperThreads`.
    public static var setThreadsEnvironment: Bool { threadSettingIsOurs.withLock { $0 } }

    /// What every executable does first, before any BLAS call and any other thread: the CPU's
    /// vector kernels where OpenBLAS fell back to generic ones (`BLASKernels.selectForThisCPU`),
    /// then no spinning helper threads (`stopHelperThreads`). Returns the line to log, if any.
    public static func setUpForThisProcess() -> String? {
        let note = BLASKernels.selectForThisCPU().note
        stopHelperThreads()
        return note
    }

    /// OpenBLAS starts (cores − 1) helper threads when it loads, before `configureThreads`
    /// can ask for one, and each spins on sched_yield after every call before it sleeps, which
    /// several lora-ga processes on few cores feel. Unless the user asked for more threads, this
    /// stops them and sets OPENBLAS_NUM_THREADS=1 for child processes, whose OpenBLAS then starts
    /// none. Call first thing in an executable, before any BLAS call.
    public static func stopHelperThreads() {
        guard getenvString("OPENBLAS_NUM_THREADS") == nil else { return }
        setenv("OPENBLAS_NUM_THREADS", "1", 1)
        threadSettingIsOurs.withLock { $0 = true }
        openblas_set_num_threads(1)
        BLASKernels.openBLASEntry("blas_thread_shutdown_")?()
    }
}

func getenvString(_ name: String) -> String? {
    guard let value = getenv(name) else { return nil }
    return String(cString: value)
}
