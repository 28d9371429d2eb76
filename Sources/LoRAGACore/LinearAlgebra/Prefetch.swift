import CPrefetch

/// Software prefetch for loops that stream a buffer much larger than the caches from memory.
///
/// The hardware prefetchers do not cross 4 KB pages, so a loop that walks fresh memory waits
/// for the first lines of every page. On the project's 2-core Xeon VM, asking for the line
/// 4 KB ahead while streaming 180 MB: `ShardChecksum` over a mapped gradient file (a worker's
/// sendfile path) 4.1–4.7 → 8.4–8.5 GB/s, near its in-cache speed; adding a cached 1 MB payload
/// into a 180 MB sum 3.9 → 4.8 GB/s (in C). Four workers into one 4096×11008 dense layer,
/// 8 alternating runs each: ingest 1446 → 1655 MB/s on average.
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
