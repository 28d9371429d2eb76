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
