import Testing
import LoRAGACore
import LoRAGAWire
@testable import LoRAGAWorker

/// How many rows a worker puts in a shard: 4 MB of payload, except in sketch mode, where the
/// coordinator multiplies every shard by wide test matrices and wants row blocks that amortize
/// packing them (but no shard above 16 MB).
@Suite struct ShardSizeTests {
    func spec(_ mode: SVDMode, sketchWidth: UInt32 = 160) -> JobSpec {
        JobSpec(jobID: "j", mode: mode, rank: 8, sketchWidth: sketchWidth, seed: 1, powerIterations: 5,
                rowsPerShard: 0, payloadDType: .f32, compression: .uncompressed)
    }

    func rows(_ shape: (Int, Int), _ mode: SVDMode, payloadBytes: Int = 4) -> Int {
        WorkerClient.rowsPerShard(rows: shape.0, cols: shape.1, payloadBytes: payloadBytes, spec: spec(mode), shardBytes: 4 << 20)
    }

    @Test("dense shards are 4 MB of payload whatever the width")
    func dense() {
        #expect(rows((8192, 28672), .dense) == (4 << 20) / (28672 * 4))        // 36 rows
        #expect(rows((4096, 11008), .dense) == (4 << 20) / (11008 * 4))        // 95 rows
        #expect(rows((4096, 11008), .dense, payloadBytes: 2) == (4 << 20) / (11008 * 2))
        #expect(rows((10, 4096), .dense) == 10)                                  // a small layer: one shard
    }

    @Test("sketch shards hold the row blocks the coordinator's products want, at most 16 MB")
    func sketch() {
        // k = 160, s = 321: Ω and Ξᵀ of a 28672-wide layer are 55 MB, so 256-row blocks, capped at 16 MB.
        #expect(rows((8192, 28672), .sketch) == (16 << 20) / (28672 * 4))      // 146 rows instead of 36
        #expect(rows((4096, 11008), .sketch) == 256)                             // 11 MB
        #expect(rows((4096, 4096), .sketch) == 256)                              // 4 MB already holds 256 rows
        #expect(rows((100, 11008), .sketch) == 100)
        #expect(rows((8192, 28672), .power) == rows((8192, 28672), .dense))     // power sends no shards; unchanged
    }
}
