import LoRAGAWire
import NIOCore
import Testing

@Suite("ShardChecksum")
struct ShardChecksumTests {
    /// Bytes both the tests and the reference script can make: byte i is bits 7…14 of
    /// i · 2654435761 (mod 2⁶⁴).
    static func pattern(_ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: (UInt64($0) &* 2_654_435_761) >> 7) }
    }

    /// `XXH3_64bits(pattern(n), n)` of the system's libxxhash 0.8.1, through Python's ctypes
    /// (`ctypes.CDLL("libxxhash.so.0").XXH3_64bits`): every short-input branch of XXH3 (0, 1–3,
    /// 4–8, 9–16, 17–128, 129–240 bytes) at its edges, and long inputs around the stripe
    /// (64 B), buffer (256 B) and block (1 KB) boundaries.
    static let knownAnswers: [(count: Int, hash: UInt64)] = [
        (0, 0x2D06_8005_38D3_94C2), (1, 0xC44B_DFF4_074E_ECDB), (2, 0x075F_073A_756C_896A),
        (3, 0x52AA_B5EF_B65B_A70C), (4, 0xAD40_0F5F_F034_8D48), (5, 0xAEC5_73E0_64C1_8474),
        (8, 0xA452_5FD0_3FD9_B3FB), (9, 0x34EF_567B_4F2F_73EC), (12, 0x74F8_8501_500A_428B),
        (16, 0x2F10_4D56_BE42_214A), (17, 0x3E6D_F1CC_1FB3_5F38), (31, 0xDD98_1C3C_EF42_D0C3),
        (32, 0x72E6_3158_5F20_7486), (33, 0x4395_74E7_2CBD_E155), (64, 0xD583_2B32_64A5_3922),
        (65, 0xDDB9_5E9A_A0A1_3C14), (96, 0x6789_1A95_083D_3480), (97, 0x1EA6_1071_44E9_E897),
        (128, 0x6531_3193_AC18_BFCE), (129, 0x4310_7010_904F_124D), (130, 0xCEC0_DBFB_8A2D_E598),
        (200, 0x6E51_D11C_AD99_6EFA), (239, 0xE199_50AE_19DD_98F0), (240, 0x8AA7_F1FC_572D_11D6),
        (241, 0xDDB1_2824_1A3B_606B), (255, 0x6A44_0B62_18CB_C55A), (256, 0xF10A_A339_793C_BEB9),
        (257, 0xDFFF_9B87_8B13_68D4), (320, 0xA7B5_37A1_E088_4918), (1023, 0x43FD_59E4_D8C6_FB49),
        (1024, 0x7E5F_60B4_9BFB_2C59), (1025, 0xC530_7E2F_77C7_F6C4), (1087, 0x83BB_7E42_5E77_F3E2),
        (2048, 0xDFC3_5DCC_42B0_31F9), (4103, 0xFD4A_8262_2235_1773), (16385, 0x5F4D_E27B_71C9_462E),
        (100_003, 0xF804_395D_230C_0EFD),
    ]

    @Test("known answers (XXH3-64 of libxxhash)")
    func knownAnswers() {
        for (count, hash) in Self.knownAnswers {
            #expect(ShardChecksum.hash(Self.pattern(count)) == hash, "\(count) bytes")
        }
        #expect(ShardChecksum.hash(Array("abc".utf8)) == 0x78AF_5F94_892F_3950)
        #expect(ShardChecksum.hash(Array("The quick brown fox jumps over the lazy dog".utf8)) == 0xCE7D_19A5_418F_B365)
        #expect(ShardChecksum.algorithm == "XXH3-64")
    }

    @Test("any chunking gives the one-shot value, read at any point")
    func incremental() {
        var rng = SplitMix64(seed: 5)
        for (count, hash) in Self.knownAnswers where count <= 16385 {
            let input = Self.pattern(count)
            for round in 0..<40 {
                // Small chunks walk every buffer state; large ones take the direct path.
                let largest = round % 2 == 0 ? 70 : 1500
                var checksum = ShardChecksum()
                var offset = 0
                while offset < input.count {
                    let chunk = Int.random(in: 0...min(largest, input.count - offset), using: &rng)
                    checksum.update(Array(input[offset..<(offset + chunk)]))
                    offset += chunk
                    if Int.random(in: 0..<4, using: &rng) == 0 {
                        #expect(checksum.value == ShardChecksum.hash(Array(input[..<offset])), "\(offset) of \(count)")
                    }
                }
                #expect(checksum.value == hash, "\(count) bytes, round \(round)")
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
                let chunk = chunked ? 4 * Int.random(in: 0...(Bool.random(using: &rng) ? 19 : 300), using: &rng) : bytes.count
                let end = min(bytes.count, offset + chunk)
                allFinite = bytes[offset..<end].withUnsafeBytes { checksum.updateCheckingFinite(float32: $0) } && allFinite
                offset = end
            }
            return (checksum.value, allFinite)
        }
        for count in [1, 2, 7, 8, 9, 31, 64, 77, 300, 517] {
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
