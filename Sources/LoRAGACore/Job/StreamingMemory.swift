#if canImport(Glibc)
import CMalloc
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
        _ = mallopt(M_MMAP_THRESHOLD, 32 << 20)
        _ = mallopt(M_TRIM_THRESHOLD, 256 << 20)
        #endif
    }
}
