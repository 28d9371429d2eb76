#if canImport(Glibc)
import Glibc
#endif
import LoRAGACore
import LoRAGAWire
import Testing

/// The streaming loops ask for memory 4 KB past where they read (`Prefetch`). A prefetch never
/// faults, so buffers that end right before an inaccessible page must come out exactly as
/// without it; a prefetch turned into a load would crash this test.
@Suite("Prefetching past the end of a buffer")
struct PrefetchTests {
    /// `count` floats that end exactly where two inaccessible pages begin.
    func withGuardedFloats(_ count: Int, _ body: (UnsafeMutablePointer<Float>) throws -> Void) throws {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let dataPages = (4 * count + page - 1) / page
        let mapping = try #require(mmap(nil, (dataPages + 2) * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        try #require(mapping != MAP_FAILED)
        defer { munmap(mapping, (dataPages + 2) * page) }
        let guardPages = mapping + dataPages * page
        try #require(mprotect(guardPages, 2 * page, PROT_NONE) == 0)
        try body((guardPages - 4 * count).assumingMemoryBound(to: Float.self))
    }

    @Test("hash-and-check, store, add, NaN scan and sum of squares of buffers that end at a guard page", arguments: [1, 15, 1000, 1024, 3001])
    func loopsEndingAtAGuardPage(count: Int) throws {
        let values = (0..<count).map { Float($0 % 97) - 48 }
        try withGuardedFloats(count) { source in
            try withGuardedFloats(count) { target in
                source.update(from: values, count: count)
                let bytes = UnsafeRawBufferPointer(start: source, count: 4 * count)

                var checked = ShardChecksum()
                let finite = checked.updateCheckingFinite(float32: bytes)
                #expect(finite)
                #expect(checked.value == values.withUnsafeBytes { ShardChecksum.hash($0) })

                #expect(!FloatKernels.accumulate(source, count: count, into: target, store: true))
                #expect(!FloatKernels.accumulate(source, count: count, into: target, store: false))
                #expect((0..<count).allSatisfy { target[$0] == 2 * values[$0] })

                #expect(!FloatKernels.containsNonFinite(source, count: count))
                let block = RowBlock(rowStart: 0, rowCount: 1, cols: count, values: UnsafeBufferPointer(start: source, count: count))
                let expected = values.reduce(0.0) { $0 + Double($1) * Double($1) }
                #expect(abs(block.frobeniusNormSquared - expected) <= 1e-6 * expected)
            }
        }
    }
}
