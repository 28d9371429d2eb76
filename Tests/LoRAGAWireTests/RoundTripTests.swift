import LoRAGAWire
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

@Suite("Round trips")
struct RoundTripTests {
    @Test("samples cover every message type")
    func samplesCoverEveryType() {
        let covered = Set(Samples.messages.map(\.type))
        #expect(covered == Set(WireMessageType.allCases))
    }

    @Test("every message survives encode → decode, payload-level")
    func payloadRoundTrip() throws {
        for message in Samples.messages {
            var buffer = ByteBuffer()
            message.encodePayload(into: &buffer)
            let decoded = try WireMessage(type: message.type, payload: &buffer)
            #expect(decoded == message)
            #expect(buffer.readableBytes == 0, "payload of \(message.type) not fully consumed")
        }
    }

    @Test("FrameDecoder passes ByteToMessageDecoderVerifier (drip feed, batches, single frames)")
    func verifier() throws {
        let pairs = try Samples.messages.map { (try Samples.frame($0), [$0]) }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { FrameDecoder() }
    }

    @Test("verifier also passes with two messages per input buffer")
    func verifierPairs() throws {
        let messages = Samples.messages
        let pairs = try stride(from: 0, to: messages.count - 1, by: 2).map { i in
            var buffer = try Samples.frame(messages[i])
            var second = try Samples.frame(messages[i + 1])
            buffer.writeBuffer(&second)
            return (buffer, [messages[i], messages[i + 1]])
        }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { FrameDecoder() }
    }

    @Test("EmbeddedChannel: writer → bytes → decoder; bulk bytes leave uncopied")
    func embeddedChannel() throws {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers([
            ByteToMessageHandler(FrameDecoder()),
            FrameWriter(),
        ])
        for message in Samples.messages {
            try channel.writeOutbound(message)
            var bytes = try #require(try channel.readOutbound(as: ByteBuffer.self))
            if var bulk = try channel.readOutbound(as: ByteBuffer.self) {
                // The second write is the message's own buffer, not a copy of it.
                let payload: ByteBuffer? = switch message {
                case .shard(let m): m.payload
                case .powerRequest(let m): m.payload
                case .powerReply(let m): m.payload
                default: nil
                }
                let sent = bulk.withUnsafeReadableBytes { $0.baseAddress }
                #expect(sent != nil && sent == payload?.withUnsafeReadableBytes { $0.baseAddress })
                bytes.writeBuffer(&bulk)
            }
            #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
            #expect(bytes == (try Samples.frame(message)))
            try channel.writeInbound(bytes)
            let decoded = try #require(try channel.readInbound(as: WireMessage.self))
            #expect(decoded == message)
            #expect(try channel.readInbound(as: WireMessage.self) == nil)
        }
        #expect(try channel.finish().isClean)
    }

    @Test("EmbeddedChannel: a coordinator and a worker talk through two pipelines")
    func twoPeers() throws {
        func peer() throws -> EmbeddedChannel {
            let channel = EmbeddedChannel()
            try channel.pipeline.syncOperations.addHandlers([
                ByteToMessageHandler(FrameDecoder()), FrameWriter(),
            ])
            return channel
        }
        let worker = try peer()
        let coordinator = try peer()
        func pass(_ message: WireMessage, from: EmbeddedChannel, to: EmbeddedChannel) throws -> WireMessage? {
            try from.writeOutbound(message)
            while let bytes = try from.readOutbound(as: ByteBuffer.self) {
                try to.writeInbound(bytes)
            }
            return try to.readInbound(as: WireMessage.self)
        }
        let conversation: [(WireMessage, toCoordinator: Bool)] = [
            (.hello(Hello(workerID: "w0", sessionNonce: 1)), true),
            (.challenge(Challenge(nonce: .zero)), false),
            (.jobSpec(JobSpec(jobID: "j", mode: .dense, rank: 4, sketchWidth: 10, seed: 1, powerIterations: 2,
                              rowsPerShard: 2, payloadDType: .f32, compression: .uncompressed)), false),
            (.announce(Announce(layers: [LayerInfo(name: "l0", rows: 4, cols: 3, sourceDType: .f32)])), true),
            (.layerBegin(LayerBegin(layerIndex: 0, name: "l0")), false),
            (.shard(Shard(layerIndex: 0, rowStart: 0, rowCount: 2, cols: 3, dtype: .f32,
                          payload: ByteBuffer(float32LittleEndian: Samples.floats(6)))), true),
            (.shard(Shard(layerIndex: 0, rowStart: 2, rowCount: 2, cols: 3, dtype: .f32,
                          payload: ByteBuffer(float32LittleEndian: Samples.floats(6, offset: 6)))), true),
            (.layerCommit(LayerCommit(layerIndex: 0, shardCount: 2, rowCount: 4, checksum: 99)), true),
            (.layerDone(LayerDone(layerIndex: 0)), false),
            (.jobDone(JobDone(adapterPath: "/tmp/a", layers: 1)), false),
            (.goodbye(Goodbye(reason: "done")), true),
        ]
        for (message, toCoordinator) in conversation {
            let received = toCoordinator
                ? try pass(message, from: worker, to: coordinator)
                : try pass(message, from: coordinator, to: worker)
            #expect(received == message)
        }
        #expect(try worker.finish().isClean)
        #expect(try coordinator.finish().isClean)
    }

    @Test("decoded shard payload is a slice of the received frame, not a copy")
    func shardPayloadIsSlice() throws {
        let message = WireMessage.shard(Shard(
            layerIndex: 0, rowStart: 0, rowCount: 64, cols: 64, dtype: .f32,
            payload: ByteBuffer(float32LittleEndian: Samples.floats(64 * 64))))
        let frame = try Samples.frame(message)
        var buffer = frame
        var decoder = FrameDecoder()
        guard case .shard(let shard) = try decoder.decode(buffer: &buffer) else {
            Issue.record("not a shard")
            return
        }
        let frameBase = frame.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        let payloadBase = shard.payload.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        #expect(payloadBase == frameBase + UInt(4 + 1 + Shard.headerBytes))
        #expect(shard.payload.readFloat32LittleEndianArray() == Samples.floats(64 * 64))
    }

    @Test("frame layout is the documented one")
    func frameLayout() throws {
        let frame = try Samples.frame(.layerDone(LayerDone(layerIndex: 0x0102_0304)))
        #expect(Array(frame.readableBytesView) == [5, 0, 0, 0, 8, 0x04, 0x03, 0x02, 0x01])
        let hello = try Samples.frame(.hello(Hello(workerID: "ab", sessionNonce: 1)))
        #expect(Array(hello.readableBytesView.prefix(13)) == [47, 0, 0, 0, 1, 5, 0, 2, 0, 0x61, 0x62, 1, 0])
        #expect(hello.readableBytes == 4 + 1 + 2 + 2 + 2 + 8 + 32)
    }

    @Test("power messages carry their floats")
    func powerValues() throws {
        let values = Samples.floats(12)
        let request = PowerRequest(layerIndex: 1, round: 2, side: .corange, matrixRows: 4, matrixCols: 3, values: values)
        let decoded = try Samples.decodeAll(try Samples.frame(.powerRequest(request)))
        guard case .powerRequest(let back)? = decoded.first else {
            Issue.record("no power request decoded")
            return
        }
        #expect(back.values == values)
        #expect(back.side == .corange)
    }
}

extension ByteBuffer {
    /// Test convenience: all readable bytes as floats.
    func readFloat32LittleEndianArray() -> [Float]? {
        getFloat32LittleEndian(at: readerIndex, count: readableFloat32Count)
    }
}
