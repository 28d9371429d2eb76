import LoRAGAWire
import NIOCore
import NIOEmbedded
import Testing

/// The coordinator's decoder: uncompressed shards arrive as pieces of the received bytes,
/// everything else as whole messages, however the stream is cut into reads.
@Suite struct StreamingDecoderTests {
    /// Feeds `stream` in reads of random sizes and puts the shards back together.
    func decode(_ stream: ByteBuffer, seed: UInt64, maxRead: Int) throws -> [WireMessage] {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(StreamingFrameDecoder()))
        var rng = SplitMix64(seed: seed)
        var rest = stream
        var decoded: [WireMessage] = []
        var open: (shard: Shard, payload: ByteBuffer)?
        while rest.readableBytes > 0 {
            try channel.writeInbound(rest.readSlice(length: Int.random(in: 1...Swift.min(maxRead, rest.readableBytes), using: &rng))!)
            while let frame = try channel.readInbound(as: InboundFrame.self) {
                switch frame {
                case .message(let message):
                    #expect(open == nil, "a message inside a shard's rows")
                    decoded.append(message)
                case .shardPiece(var piece):
                    #expect(piece.bytes.readableBytes > 0)
                    if piece.isFirst {
                        #expect(open == nil)
                        open = (piece.shard, ByteBuffer())
                    }
                    #expect(piece.shard == open?.shard && piece.offset == open?.payload.readableBytes, "pieces in order, of one shard")
                    let last = piece.isLast
                    #expect(piece.checksumMatches == (last ? true : nil), "a verdict on the last piece only, and these are intact")
                    open?.payload.writeBuffer(&piece.bytes)
                    if last, let (fields, payload) = open {
                        var shard = fields
                        shard.payload = payload
                        decoded.append(.shard(shard))
                        open = nil
                    }
                }
            }
        }
        #expect(try channel.finish().isClean)
        return decoded
    }

    @Test("any cut of the stream gives the same messages; uncompressed shards come in pieces", arguments: [1, 7, 64, 4096])
    func anyChunking(maxRead: Int) throws {
        var stream = ByteBuffer()
        for message in Samples.messages { try message.encodeFrame(into: &stream) }
        for seed: UInt64 in 1...5 {
            #expect(try decode(stream, seed: seed, maxRead: maxRead) == Samples.messages)
        }
    }

    @Test("the last piece says whether the shard's bytes match its checksum, however the reads are cut", arguments: [1, 7, 300, 4096])
    func checksumVerdict(maxRead: Int) throws {
        let shard = WireMessage.shard(Shard(layerIndex: 0, rowStart: 0, rowCount: 16, cols: 16, dtype: .f32,
                                            payload: ByteBuffer(float32LittleEndian: Samples.floats(256))))
        let intact = try Samples.frame(shard)
        for damagedByte in [nil, 4 + 1 + Shard.headerBytes, intact.readableBytes - 300, intact.readableBytes - 1] {
            var frame = intact
            if let at = damagedByte { frame.setInteger(intact.getInteger(at: at, as: UInt8.self)! ^ 0x10, at: at) }
            let channel = EmbeddedChannel(handler: ByteToMessageHandler(StreamingFrameDecoder()))
            var verdicts: [Bool?] = []
            var rest = frame
            while rest.readableBytes > 0 {
                try channel.writeInbound(rest.readSlice(length: Swift.min(maxRead, rest.readableBytes))!)
                while case .shardPiece(let piece)? = try channel.readInbound(as: InboundFrame.self) { verdicts.append(piece.checksumMatches) }
            }
            #expect(try channel.finish().isClean)
            #expect(verdicts.last == .some(damagedByte == nil), "byte \(String(describing: damagedByte)) damaged")
            #expect(verdicts.dropLast().allSatisfy { $0 == nil })
        }
    }

    @Test("a shard frame whose length disagrees with its rows is refused before its rows are read")
    func lengthMismatch() throws {
        let shard = WireMessage.shard(Shard(layerIndex: 0, rowStart: 0, rowCount: 2, cols: 3, dtype: .f32,
                                            payload: ByteBuffer(float32LittleEndian: Samples.floats(6))))
        var frame = try Samples.frame(shard)
        frame.setInteger(frame.getInteger(at: 0, endianness: .little, as: UInt32.self)! + 4, at: 0, endianness: .little)
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(StreamingFrameDecoder()))
        #expect(throws: WireError.self) { try channel.writeInbound(frame.getSlice(at: 0, length: 4 + 1 + Shard.headerBytes)!) }
        _ = try? channel.finish()
    }

    @Test("a connection that ends inside a shard's rows is a truncated frame")
    func endsMidShard() throws {
        let shard = WireMessage.shard(Shard(layerIndex: 0, rowStart: 0, rowCount: 2, cols: 3, dtype: .f32,
                                            payload: ByteBuffer(float32LittleEndian: Samples.floats(6))))
        let frame = try Samples.frame(shard)
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(StreamingFrameDecoder()))
        try channel.writeInbound(frame.getSlice(at: 0, length: frame.readableBytes - 5)!)
        let piece = try #require(try channel.readInbound(as: InboundFrame.self))
        guard case .shardPiece(let first) = piece else { Issue.record("expected a piece, got \(piece)"); return }
        #expect(first.isFirst && !first.isLast && first.bytes.readableBytes == 24 - 5)
        #expect(throws: WireError.self) { _ = try channel.finish() }
    }
}
