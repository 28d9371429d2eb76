import LoRAGAWire
import NIOCore
import Testing

@Suite("ShardChecksum")
struct ShardChecksumTests {
    /// Reference values computed with the system's libxxhash (XXH64).
    static let knownAnswers: [(input: [UInt8], seed: UInt64, hash: UInt64)] = {
        let long = Array((0..<4).flatMap { _ in (0...255).map(UInt8.init) }) + (0..<7).map(UInt8.init)
        let seed: UInt64 = 0x9E37_79B9_7F4A_7C15
        return [
            (Array("".utf8), 0, 0xEF46_DB37_51D8_E999),
            (Array("".utf8), seed, 0xC434_9FC9_3C01_0000),
            (Array("a".utf8), 0, 0xD24E_C4F1_A98C_6E5B),
            (Array("a".utf8), seed, 0x9A7C_6D2E_A455_68C9),
            (Array("abc".utf8), 0, 0x44BC_2CF5_AD77_0999),
            (Array("abc".utf8), seed, 0x2ED0_F59D_6B43_AC8B),
            (Array("Nobody inspects the spammish repetition".utf8), 0, 0xFBCE_A83C_8A37_8BF1),
            (Array("Nobody inspects the spammish repetition".utf8), seed, 0xEB8B_157C_A26C_BF34),
            (Array("The quick brown fox jumps over the lazy dog".utf8), 0, 0x0B24_2D36_1FDA_71BC),
            (Array("The quick brown fox jumps over the lazy dog".utf8), seed, 0x7CFA_C668_32F6_6B74),
            (long, 0, 0xEBD3_5A59_60A6_9EBC),
            (long, seed, 0x4818_68CD_275C_C494),
        ]
    }()

    @Test("known answers (xxHash64)")
    func knownAnswers() {
        for (input, seed, hash) in Self.knownAnswers {
            #expect(ShardChecksum.hash(input, seed: seed) == hash, "\(input.count) bytes, seed \(seed)")
        }
        #expect(ShardChecksum.algorithm == "xxHash64")
    }

    @Test("any chunking gives the one-shot value")
    func incremental() {
        var rng = SplitMix64(seed: 5)
        for (input, seed, hash) in Self.knownAnswers {
            for _ in 0..<50 {
                var checksum = ShardChecksum(seed: seed)
                var offset = 0
                while offset < input.count {
                    let chunk = Int.random(in: 0...min(70, input.count - offset), using: &rng)
                    checksum.update(Array(input[offset..<(offset + chunk)]))
                    offset += chunk
                }
                #expect(checksum.value == hash)
                #expect(checksum.byteCount == UInt64(input.count))
            }
        }
    }

    @Test("reading the value does not disturb later updates; ByteBuffer input uses readable bytes")
    func continuation() {
        let input = Samples.bytes(1000, seed: 3)
        var checksum = ShardChecksum()
        checksum.update(Array(input[0..<333]))
        let partial = checksum.value
        #expect(partial == ShardChecksum.hash(Array(input[0..<333])))
        var buffer = ByteBuffer(bytes: [0xAA, 0xBB])
        buffer.writeBytes(input[333...])
        buffer.moveReaderIndex(forwardBy: 2)
        checksum.update(buffer)
        #expect(buffer.readableBytes == 667)
        #expect(checksum.value == ShardChecksum.hash(input))
    }

    @Test("a layer's commit checksum is the hash of its shard checksums in send order; order matters")
    func sendOrder() {
        let a = ShardChecksum.hash(Samples.bytes(100, seed: 1)), b = ShardChecksum.hash(Samples.bytes(60, seed: 2))
        var sender = ShardChecksum()
        sender.addShard(a)
        sender.addShard(b)
        #expect(sender.value == ShardChecksum.layer(shardChecksums: [a, b]))
        #expect(sender.value == ShardChecksum.hash(withUnsafeBytes(of: a.littleEndian, Array.init) + withUnsafeBytes(of: b.littleEndian, Array.init)))
        #expect(sender.value != ShardChecksum.layer(shardChecksums: [b, a]))
        #expect(sender.value != ShardChecksum.layer(shardChecksums: [a]))
    }

    @Test("hashing Float32 values also tells whether all are finite: any value at any position, any chunking")
    func finitenessRidesAlong() {
        var rng = SplitMix64(seed: 11)
        let specials: [Float] = [.nan, -.nan, .signalingNaN, .infinity, -.infinity, Float(bitPattern: 0x7FFF_FFFF), Float(bitPattern: 0xFF80_0001)]
        let finite: [Float] = [0, -0, .greatestFiniteMagnitude, -.greatestFiniteMagnitude, .leastNonzeroMagnitude,
                               Float(bitPattern: 0x7F7F_FFFF), Float(bitPattern: 0x807F_FFFF), 1, -3.5e-20]
        func feed(_ values: [Float], chunked: Bool) -> (hash: UInt64, finite: Bool) {
            let bytes = values.withUnsafeBytes { Array($0) }
            var checksum = ShardChecksum()
            var allFinite = true
            var offset = 0
            while offset < bytes.count {
                let chunk = chunked ? 4 * Int.random(in: 0...19, using: &rng) : bytes.count
                let end = min(bytes.count, offset + chunk)
                allFinite = bytes[offset..<end].withUnsafeBytes { checksum.updateCheckingFinite(float32: $0) } && allFinite
                offset = end
            }
            return (checksum.value, allFinite)
        }
        for count in [1, 2, 7, 8, 9, 31, 64, 77] {
            var values = (0..<count).map { _ in Float.random(in: -1e6...1e6, using: &rng) }
            for (index, special) in finite.enumerated() { values[index % count] = special }
            let plain = ShardChecksum.hash(values.withUnsafeBytes { Array($0) })
            for chunked in [false, true] {
                let result = feed(values, chunked: chunked)
                #expect(result.hash == plain && result.finite, "\(count) finite values, chunked \(chunked)")
            }
            for position in 0..<count {
                for special in specials {
                    var bad = values
                    bad[position] = special
                    let expected = ShardChecksum.hash(bad.withUnsafeBytes { Array($0) })
                    for chunked in [false, true] {
                        let result = feed(bad, chunked: chunked)
                        #expect(result.hash == expected && !result.finite, "\(special.bitPattern) at \(position) of \(count), chunked \(chunked)")
                    }
                }
            }
        }
    }
}
