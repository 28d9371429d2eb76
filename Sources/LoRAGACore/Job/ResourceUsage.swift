#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What this process has used so far, for the figures the daemons print at the end.
public enum ResourceUsage {
    /// Peak resident set size in bytes (getrusage's ru_maxrss: KiB on Linux).
    public static var peakResidentBytes: Int {
        var usage = rusage()
        guard getrusage(resourceUsageSelf, &usage) == 0 else { return 0 }
        #if os(Linux)
        return Int(usage.ru_maxrss) * 1024
        #else
        return Int(usage.ru_maxrss)
        #endif
    }

    /// User + system CPU seconds.
    public static var cpuSeconds: Double {
        var usage = rusage()
        guard getrusage(resourceUsageSelf, &usage) == 0 else { return 0 }
        func seconds(_ time: timeval) -> Double { Double(time.tv_sec) + Double(time.tv_usec) * 1e-6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }
}

#if os(Linux)
private let resourceUsageSelf = __rusage_who_t(RUSAGE_SELF.rawValue)
#else
private let resourceUsageSelf = RUSAGE_SELF
#endif

/// malloc settings for the daemons, which stream the same large buffers (frames of a few
/// to 16 MB, the receive cumulation) over and over.
public enum StreamingMemory {
    /// Keeps freed frame-sized buffers mapped for the next frame. glibc's defaults serve
    /// such sizes with a fresh mmap (or trim the arena right after the free), so every frame
    /// paid its page faults and the kernel's zeroing again: measured on this project's VMs,
    /// 8192×28672 dense from 2 workers, 1.2 → 1.38 GB/s ingest, worker CPU −15 %. Blocks up to
    /// 32 MB (glibc's ceiling for this setting) come from the heap and up to 256 MB of free
    /// heap stays mapped. A layer's sum (one block larger than that) still gets its own mmap
    /// and is returned when freed. The coordinator sets it for dense jobs only: in sketch mode
    /// frames queue behind the GEMMs and the kept ones only cost memory (171 → 201 MB).
    public static func keepFrameBuffersMapped() {
        #if os(Linux)
        _ = glibcMallopt(-3 /* M_MMAP_THRESHOLD */, 32 << 20)
        _ = glibcMallopt(-1 /* M_TRIM_THRESHOLD */, 256 << 20)
        #endif
    }
}

#if os(Linux)
/// `int mallopt(int, int)` from <malloc.h>, which the Glibc module does not export.
@_silgen_name("mallopt")
private func glibcMallopt(_ parameter: Int32, _ value: Int32) -> Int32
#endif
