import LoRAGACore
import LoRAGAWire
import NIOCore
import NIOEmbedded
import Testing

/// Random valid messages, small enough to fuzz quickly.
private struct MessageGenerator {
    var rng: SplitMix64

    mutating func int<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        // Mix extremes with ordinary values: edges are where codecs break.
        switch UInt8.random(in: 0..<4, using: &rng) {
        case 0: return 0
        case 1: return .max
        default: return T.random(in: 0...T(truncatingIfNeeded: 1000), using: &rng)
        }
    }

    mutating func string(maxCharacters: Int, allowEmpty: Bool) -> String {
        let alphabet: [Character] = ["a", "z", "0", ".", "_", "é", "ß", "漢", "🙂", " "]
        let count = Int.random(in: (allowEmpty ? 0 : 1)...maxCharacters, using: &rng)
        return String((0..<count).map { _ in alphabet.randomElement(using: &rng)! })
    }

    mutating func bytes(_ count: Int) -> ByteBuffer {
        ByteBuffer(bytes: (0..<count).map { _ in UInt8.random(in: .min ... .max, using: &rng) })
    }

    mutating func message() -> WireMessage {
        switch WireMessageType.allCases.randomElement(using: &rng)! {
        case .hello:
            return .hello(Hello(protocolVersion: int(), workerID: string(maxCharacters: 20, allowEmpty: false),
                                sessionNonce: int(), authProof: .random(using: &rng)))
        case .challenge:
            return .challenge(Challenge(nonce: .random(using: &rng)))
        case .jobSpec:
            return .jobSpec(JobSpec(
                protocolVersion: int(), jobID: string(maxCharacters: 10, allowEmpty: false),
                mode: SVDMode.allCases.randomElement(using: &rng)!, rank: int(), sketchWidth: int(), seed: int(),
                powerIterations: int(), rowsPerShard: int(),
                payloadDType: [.f32, .bf16, .f16].randomElement(using: &rng)!,
                compression: WireCompression.allCases.randomElement(using: &rng)!,
                skipLayers: (0..<Int.random(in: 0...3, using: &rng)).map { _ in string(maxCharacters: 12, allowEmpty: false) }))
        case .announce:
            return .announce(Announce(layers: (0..<Int.random(in: 0...4, using: &rng)).map { _ in
                LayerInfo(name: string(maxCharacters: 12, allowEmpty: false), rows: max(1, int()), cols: max(1, int()),
                          sourceDType: TensorDType.allCases.randomElement(using: &rng)!)
            }))
        case .layerBegin:
            return .layerBegin(LayerBegin(layerIndex: int(), name: string(maxCharacters: 16, allowEmpty: false)))
        case .shard:
            let dtype: TensorDType = [.f32, .bf16, .f16].randomElement(using: &rng)!
            let rows = UInt32.random(in: 1...4, using: &rng)
            let cols = UInt64.random(in: 1...8, using: &rng)
            let size = Int(rows) * Int(cols) * dtype.byteSize
            let rowStart = UInt64.random(in: 0...1_000_000, using: &rng)
            if Bool.random(using: &rng) {
                return .shard(Shard(layerIndex: int(), rowStart: rowStart, rowCount: rows, cols: cols, dtype: dtype, payload: bytes(size)))
            }
            return .shard(Shard(layerIndex: int(), rowStart: rowStart, rowCount: rows, cols: cols, dtype: dtype,
                                compression: .zstdShuffled, uncompressedBytes: UInt64(size),
                                payload: bytes(Int.random(in: 1...size, using: &rng))))
        case .layerCommit:
            return .layerCommit(LayerCommit(layerIndex: int(), shardCount: int(), rowCount: int(), checksum: int()))
        case .layerDone:
            return .layerDone(LayerDone(layerIndex: int()))
        case .powerRequest, .powerReply:
            let rows = UInt32.random(in: 1...5, using: &rng)
            let cols = UInt32.random(in: 1...5, using: &rng)
            let values = (0..<Int(rows * cols)).map { _ in Float.random(in: -1...1, using: &rng) }
            let side = WirePowerSide.allCases.randomElement(using: &rng)!
            return Bool.random(using: &rng)
                ? .powerRequest(PowerRequest(layerIndex: int(), round: int(), side: side, matrixRows: rows, matrixCols: cols, values: values))
                : .powerReply(PowerReply(layerIndex: int(), round: int(), side: side, matrixRows: rows, matrixCols: cols, values: values))
        case .error:
            return .error(ErrorMessage(code: WireErrorCode.allCases.randomElement(using: &rng)!, message: string(maxCharacters: 20, allowEmpty: true)))
        case .jobDone:
            return .jobDone(JobDone(adapterPath: string(maxCharacters: 20, allowEmpty: true), layers: int()))
        case .goodbye:
            return .goodbye(Goodbye(reason: string(maxCharacters: 20, allowEmpty: true)))
        }
    }
}

private struct Outcomes {
    var frames = 0
    var decoded = 0
    var errors: [String: Int] = [:]

    mutating func record(_ error: WireError) {
        let kind: String
        switch error {
        case .frameTooLarge: kind = "frameTooLarge"
        case .emptyFrame: kind = "emptyFrame"
        case .unknownMessageType: kind = "unknownMessageType"
        case .malformed: kind = "malformed"
        case .truncatedFrame: kind = "truncatedFrame"
        }
        errors[kind, default: 0] += 1
    }
}

@Suite("Fuzz")
struct FuzzTests {
    /// Feeds `bytes` in random chunks; every decoded frame must re-encode to exactly the bytes it came from.
    private static func feed(_ bytes: [UInt8], rng: inout SplitMix64, outcomes: inout Outcomes) {
        var decoder = FrameDecoder(maxFrameLength: 1 << 16)
        var buffer = ByteBuffer()
        var offset = 0
        func drain(last: Bool) throws(WireError) {
            while true {
                let snapshot = buffer
                let message = last
                    ? try decoder.decodeLast(buffer: &buffer, seenEOF: true)
                    : try decoder.decode(buffer: &buffer)
                guard let message else { return }
                outcomes.decoded += 1
                let consumed = buffer.readerIndex - snapshot.readerIndex
                let original = snapshot.getSlice(at: snapshot.readerIndex, length: consumed)!
                var reencoded = ByteBuffer()
                do {
                    try message.encodeFrame(into: &reencoded, maxFrameLength: 1 << 16)
                } catch {
                    Issue.record("decoded \(message.type) does not re-encode: \(error)")
                }
                #expect(reencoded == original, "\(message.type) decoded from bytes it does not re-encode to")
            }
        }
        do {
            while offset < bytes.count {
                let chunk = Int.random(in: 1...max(1, bytes.count - offset), using: &rng)
                buffer.writeBytes(bytes[offset..<(offset + chunk)])
                offset += chunk
                try drain(last: false)
            }
            try drain(last: true)
        } catch {
            // `error` is statically a WireError: the decoder cannot throw anything else.
            outcomes.record(error)
        }
    }

    @Test("10,000 random and mutated frames: each decodes or throws a WireError, never crashes")
    func fuzz() throws {
        var rng = SplitMix64(seed: 0x10AA_6A00)
        var generator = MessageGenerator(rng: SplitMix64(seed: 0xF0_0D))
        var outcomes = Outcomes()
        for i in 0..<10_000 {
            var bytes: [UInt8]
            let valid = Array(try Samples.frame(generator.message()).readableBytesView)
            switch i % 5 {
            case 0:
                // Valid frames, several back to back.
                bytes = valid + Array(try Samples.frame(generator.message()).readableBytesView)
            case 1:
                // Flip a few bytes anywhere (length prefix included).
                bytes = valid
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
                }
            case 2:
                // Mutate the payload only and keep the length honest: exercises the payload parsers.
                var payload = Array(valid.dropFirst(5))
                switch Int.random(in: 0..<4, using: &rng) {
                case 0 where !payload.isEmpty:
                    payload.removeLast(Int.random(in: 1...payload.count, using: &rng))
                case 1:
                    payload += (0..<Int.random(in: 1...8, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                default:
                    if !payload.isEmpty {
                        payload[Int.random(in: 0..<payload.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                    }
                }
                bytes = Array(Samples.rawFrame(type: valid[4], payload: payload).readableBytesView)
            case 3:
                // Random payload under a valid type byte and an honest small length.
                let payload = (0..<Int.random(in: 0...80, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                bytes = Array(Samples.rawFrame(type: UInt8.random(in: 0...15, using: &rng), payload: payload).readableBytesView)
            default:
                // Pure noise, sometimes cut short.
                bytes = (0..<Int.random(in: 0...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                if i % 20 == 4 && bytes.count >= 4 {
                    bytes.replaceSubrange(0..<4, with: [0, 0, 0, 0])  // a zero length is rare in noise
                }
            }
            outcomes.frames += 1
            Self.feed(bytes, rng: &rng, outcomes: &outcomes)
        }
        // The generator must actually reach every outcome, or the fuzz proves little.
        #expect(outcomes.decoded > 2_000, "\(outcomes)")
        for kind in ["frameTooLarge", "emptyFrame", "unknownMessageType", "malformed", "truncatedFrame"] {
            #expect(outcomes.errors[kind, default: 0] > 20, "too few \(kind): \(outcomes.errors)")
        }
    }

    @Test("mutated frames through a channel pipeline surface only WireErrors")
    func fuzzPipeline() throws {
        var rng = SplitMix64(seed: 99)
        var generator = MessageGenerator(rng: SplitMix64(seed: 100))
        for _ in 0..<1_000 {
            var bytes = Array(try Samples.frame(generator.message()).readableBytesView)
            bytes[Int.random(in: 0..<bytes.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
            let channel = EmbeddedChannel(handler: ByteToMessageHandler(FrameDecoder(maxFrameLength: 1 << 16)))
            do {
                try channel.writeInbound(ByteBuffer(bytes: bytes))
                _ = try channel.readInbound(as: WireMessage.self)
                _ = try channel.finish()
            } catch {
                #expect(error is WireError, "unexpected \(type(of: error)): \(error)")
            }
        }
    }
}
