#if canImport(Glibc)
import Glibc
#endif

/// Large zeroed arrays with their pages mapped by one `madvise(MADV_POPULATE_WRITE)` before
/// they are zeroed, instead of one page fault per 4 KB while zeroing: on this project's VMs a
/// fault costs several µs of trap overhead on top of the kernel's zeroing. A dense layer's sum
/// (940 MB for 8192×28672) maps its pages the same way, a few MB at a time just ahead of its
/// writes (`LayerAccumulator`), so the mapping overlaps with reading the next rows.
enum ZeroedFloats {
    /// Below this, ordinary zero-filling is as fast (and the memory is often reused heap).
    static let prefaultBytes = 4 << 20

    /// `count` zeros, their pages mapped before they are written.
    static func prefaulted(count: Int) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if let base = buffer.baseAddress {
                populate(UnsafeMutableRawPointer(base), byteCount: count * MemoryLayout<Float>.stride)
                // Populated pages of a fresh mapping are already zero, but malloc may hand back
                // reused memory: zero it anyway, now without faults.
                base.initialize(repeating: 0, count: count)
            }
            initialized = count   // Float is trivial: any bit pattern is a valid value
        }
    }

    /// Maps the whole pages inside `[start, start + byteCount)`. Best effort: kernels before
    /// 5.14 refuse the advice and the pages fault in on first write as usual.
    static func populate(_ start: UnsafeMutableRawPointer, byteCount: Int) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let first = (Int(bitPattern: start) + page - 1) / page * page
        let end = (Int(bitPattern: start) + byteCount) / page * page
        guard end > first, let aligned = UnsafeMutableRawPointer(bitPattern: first) else { return }
        _ = madvise(aligned, end - first, MADV_POPULATE_WRITE)
    }
}
