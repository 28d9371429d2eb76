import Testing
@testable import LoRAGADaemon

/// When lora-ga replaces OpenBLAS's own kernel choice, and with what.
@Suite struct BLASKernelsTests {
    static let avx512: Set<String> = ["sse3", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"]
    static let avx2: Set<String> = ["sse3", "avx", "avx2", "fma"]

    @Test("a generic fallback on a vector CPU is replaced by the widest kernels it runs")
    func genericFallback() {
        #expect(BLASKernels.replacement(current: "Prescott", cpuFlags: Self.avx512, userChoice: nil) == "SkylakeX")
        #expect(BLASKernels.replacement(current: "Nehalem", cpuFlags: Self.avx2, userChoice: nil) == "Haswell")
        #expect(BLASKernels.replacement(current: "Sandybridge", cpuFlags: Self.avx2, userChoice: "") == "Haswell")
        // AVX-512F alone (no BW/VL, e.g. Knights Landing) is not enough for the SkylakeX kernels.
        #expect(BLASKernels.replacement(current: "Prescott", cpuFlags: Self.avx2.union(["avx512f"]), userChoice: nil) == "Haswell")
    }

    @Test("OpenBLAS's own vector choice, a CPU without AVX2, and the user's OPENBLAS_CORETYPE are kept")
    func keptChoices() {
        for core in ["Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"] {
            #expect(BLASKernels.replacement(current: core, cpuFlags: Self.avx512, userChoice: nil) == nil, "\(core)")
        }
        #expect(BLASKernels.replacement(current: "Prescott", cpuFlags: ["sse3", "avx"], userChoice: nil) == nil)
        #expect(BLASKernels.replacement(current: "Prescott", cpuFlags: Self.avx512, userChoice: "Prescott") == nil)
    }

    @Test("this machine's CPU flags are read from /proc/cpuinfo")
    func readsFlags() {
        let flags = BLASKernels.cpuFlags()
        #expect(flags.contains("sse2"), "x86-64 always has sse2; read \(flags.count) flags")
    }
}
