import CPrefetch

/// Software prefetch for loops that stream a buffer much larger than the caches from memory.
///
/// The hardware prefetchers do not cross 4 KB pages, so a loop that walks fresh memory waits
/// for the first lines of every page; asking for the line 4 KB ahead brings such loops (the
/// checksum of mapped file rows, the add into a large sum) near their in-cache speed.
public enum Prefetch {
    /// How far ahead of the current position the streaming loops ask for memory.
    @inlinable public static var distance: Int { 4096 }

    @inlinable @inline(__always)
    public static func read(_ address: UnsafeRawPointer) {
        lora_prefetch_read(address)
    }

    @inlinable @inline(__always)
    public static func write(_ address: UnsafeRawPointer) {
        lora_prefetch_write(address)
    }
}
