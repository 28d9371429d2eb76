import Testing
import LoRAGAFormats

struct ZstdCodecTests {
    @Test func roundTripOfShuffledFloats() throws {
        // Real gradients, where byte shuffling pays off.
        let floats = try SafeTensorsFile(path: fixturePath("w0/grads.safetensors"))
            .readAll("encoder.layer.0.attention.self.query.weight")
        let shuffled = floats.withUnsafeBytes { ByteShuffle.shuffle($0, elementSize: 4) }
        let codec = ZstdCodec()
        let compressed = try codec.compress(shuffled, level: 1)
        let restored = try codec.decompress(compressed, expectedSize: shuffled.count)
        let unshuffled = restored.withUnsafeBytes { ByteShuffle.unshuffle($0, elementSize: 4) }
        #expect(unshuffled == floats.withUnsafeBytes { Array($0) })

        let raw = try codec.compress(floats.withUnsafeBytes { Array($0) }, level: 1)
        #expect(compressed.count < raw.count)
    }

    @Test func emptyInputRoundTrips() throws {
        let codec = ZstdCodec()
        let compressed = try codec.compress([UInt8](), level: 3)
        #expect(try codec.decompress(compressed, expectedSize: 0) == [])
    }

    @Test func wrongExpectedSizeIsAnError() throws {
        let codec = ZstdCodec()
        let compressed = try codec.compress([UInt8](repeating: 7, count: 1000))
        let error = #expect(throws: ZstdError.self) { try codec.decompress(compressed, expectedSize: 999) }
        #expect(error?.description.contains("declares 1000 bytes, expected 999") == true)
    }

    @Test func garbageIsAnError() {
        let codec = ZstdCodec()
        let error = #expect(throws: ZstdError.self) { try codec.decompress([1, 2, 3, 4, 5, 6, 7, 8], expectedSize: 8) }
        #expect(error?.description.contains("not a zstd frame") == true)
    }

    @Test func corruptedFrameIsAnError() throws {
        var random = SplitMix64(seed: 2)
        let codec = ZstdCodec()
        let input = random.gaussians(4096).withUnsafeBytes { Array($0) }
        var compressed = try codec.compress(input)
        compressed[compressed.count / 2] ^= 0x10
        // Caught by zstd's content checksum even where the entropy decoder would not notice.
        let error = #expect(throws: ZstdError.self) { _ = try codec.decompress(compressed, expectedSize: input.count) }
        #expect(error?.description.hasPrefix("zstd decompression failed") == true)
    }

    @Test func levelOutOfRangeIsAnError() {
        #expect(throws: ZstdError.self) { try ZstdCodec().compress([1, 2, 3], level: 1000) }
    }
}

struct ByteShuffleTests {
    @Test func transposesBytePlanes() {
        let bytes: [UInt8] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        // Two 4-byte elements become four 2-byte planes; the 2-byte tail is kept as is.
        let shuffled = bytes.withUnsafeBytes { ByteShuffle.shuffle($0, elementSize: 4) }
        #expect(shuffled == [0, 4, 1, 5, 2, 6, 3, 7, 8, 9])
        let halves = bytes.withUnsafeBytes { ByteShuffle.shuffle($0, elementSize: 2) }
        #expect(halves == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9])
    }

    @Test(arguments: [1, 2, 4, 8], [0, 1, 7, 64, 1001])
    func unshuffleInvertsShuffle(elementSize: Int, count: Int) {
        var random = SplitMix64(seed: UInt64(elementSize * 10_000 + count))
        let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &random) }
        let shuffled = bytes.withUnsafeBytes { ByteShuffle.shuffle($0, elementSize: elementSize) }
        #expect(shuffled.withUnsafeBytes { ByteShuffle.unshuffle($0, elementSize: elementSize) } == bytes)
    }
}
