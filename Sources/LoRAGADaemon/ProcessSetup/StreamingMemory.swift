#if canImport(Glibc)
import CMalloc
#endif

/// malloc settings for the daemons, which stream the same large buffers (frames of a few
/// to 16 MB, the receive cumulation) over and over.
public enum StreamingMemory {
    /// Keeps freed frame-sized buffers mapped for the next frame: glibc's defaults serve such
    /// sizes with a fresh mmap (or trim the arena right after the free), so every frame would
    /// pay its page faults and the kernel's zeroing again. Blocks up to 32 MB (glibc's ceiling
    /// for this setting) come from the heap and up to 256 MB of free heap stays mapped; a
    /// layer's sum still gets its own mmap and is returned when freed. The coordinator sets it
    /// for dense jobs only: in sketch mode frames queue behind the GEMMs and kept buffers only
    /// cost memory.
    public static func keepFrameBuffersMapped() {
        #if os(Linux)
        _ = mallopt(M_MMAP_THRESHOLD, 32 << 20)
        _ = mallopt(M_TRIM_THRESHOLD, 256 << 20)
        #endif
    }
}
