import COpenBLAS
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Which OpenBLAS kernels run our GEMMs.
///
/// OpenBLAS built with DYNAMIC_ARCH (Debian's) picks a kernel set when it loads, from the
/// CPU model. A release that does not know the model falls back to a generic SSE3 set:
/// OpenBLAS 0.3.21 (Debian 12) picks "Prescott" on Sapphire/Emerald Rapids Xeons, whose sgemm
/// is several times slower than the AVX-512 kernels the CPU can run. `selectForThisCPU`
/// notices such a fallback on a CPU with AVX2/AVX-512 and switches to the matching kernel set
/// through OpenBLAS's own re-initialization entry points.
public enum BLASKernels {
    /// Kernel sets that already use AVX2 or better; OpenBLAS's choice among them is kept.
    static let vectorCores: Set<String> = ["haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"]

    /// The kernel set to switch to, or nil to keep OpenBLAS's choice.
    /// - Parameters:
    ///   - current: the core name OpenBLAS chose (`openblas_get_corename`).
    ///   - cpuFlags: the CPU's feature flags as the kernel lists them in /proc/cpuinfo
    ///     (only features the OS has enabled appear there).
    ///   - userChoice: OPENBLAS_CORETYPE, if set: the user decides, never us.
    public static func replacement(current: String, cpuFlags: Set<String>, userChoice: String?) -> String? {
        guard userChoice?.isEmpty ?? true else { return nil }
        guard !vectorCores.contains(current.lowercased()) else { return nil }
        let avx512: Set<String> = ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"]
        if avx512.isSubset(of: cpuFlags) { return "SkylakeX" }
        if cpuFlags.contains("avx2") && cpuFlags.contains("fma") { return "Haswell" }
        return nil
    }

    private static let selected = Mutex<Selection?>(nil)

    /// What `selectForThisCPU` did in this process (nil if it was not called).
    public static var selection: Selection? { selected.withLock { $0 } }

    /// What `selectForThisCPU` did, for the log.
    public struct Selection: Sendable, Equatable {
        public var chosenByOpenBLAS: String
        public var inUse: String
        public var switched: Bool { chosenByOpenBLAS != inUse }

        /// One line for a log, or nil when nothing was changed.
        public var note: String? {
            guard switched else { return nil }
            return "OpenBLAS did not recognize this CPU and chose its generic \(chosenByOpenBLAS) kernels; "
                + "using \(inUse) kernels instead (set OPENBLAS_CORETYPE to choose yourself)"
        }
    }

    /// Switches OpenBLAS to the kernels this CPU supports when it fell back to generic ones.
    ///
    /// Call it once, first thing in an executable, before any BLAS call and before other
    /// threads could make one: it swaps OpenBLAS's global kernel table. (Tests do not call
    /// it: they run BLAS on many threads at once.)
    @discardableResult
    public static func selectForThisCPU() -> Selection {
        let chosen = String(cString: openblas_get_corename())
        var selection = Selection(chosenByOpenBLAS: chosen, inUse: chosen)
        defer { selected.withLock { $0 = selection } }
        guard let target = replacement(current: chosen, cpuFlags: cpuFlags(), userChoice: getenvString("OPENBLAS_CORETYPE")),
              let quit = openBLASEntry("gotoblas_dynamic_quit"),
              let initialize = openBLASEntry("gotoblas_dynamic_init")
        else { return selection }   // not a DYNAMIC_ARCH build: nothing to switch
        setenv("OPENBLAS_CORETYPE", target, 1)   // read by gotoblas_dynamic_init; children inherit it
        quit()
        initialize()
        selection.inUse = String(cString: openblas_get_corename())
        return selection
    }

    /// An OpenBLAS function outside its public API, looked up at run time so that builds
    /// without it (no DYNAMIC_ARCH, another BLAS) still link. Its return value is ignored.
    static func openBLASEntry(_ name: String) -> (@convention(c) () -> Void)? {
        guard let handle = dlopen(nil, RTLD_NOW), let symbol = dlsym(handle, name) else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) () -> Void).self)
    }

    /// Feature flags of the first CPU in /proc/cpuinfo (empty where there is none).
    static func cpuFlags() -> Set<String> {
        guard let file = fopen("/proc/cpuinfo", "r") else { return [] }
        defer { fclose(file) }
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(line) }
        while getline(&line, &capacity, file) > 0, let line {
            let text = String(cString: line)
            guard text.hasPrefix("flags"), let colon = text.firstIndex(of: ":") else { continue }
            return Set(text[text.index(after: colon)...].split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).map(String.init))
        }
        return []
    }
}
