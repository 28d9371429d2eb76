import LoRAGAWire
import NIOCore
import NIOEmbedded
import Testing

/// The decoder's error for `bytes`, or nil when it decodes cleanly.
private func decodeError(_ bytes: ByteBuffer, maxFrameLength: Int = WireProtocol.defaultMaxFrameLength) -> WireError? {
    do {
        _ = try Samples.decodeAll(bytes, maxFrameLength: maxFrameLength)
        return nil
    } catch {
        return error
    }
}

private func isMalformed(_ error: WireError?, _ type: WireMessageType, containing text: String = "") -> Bool {
    guard case .malformed(let actual, let reason)? = error else { return false }
    return actual == type && (text.isEmpty || reason.contains(text))
}

private func le16(_ value: Int) -> [UInt8] { [UInt8(value & 0xFF), UInt8(value >> 8 & 0xFF)] }
private func le32(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian, Array.init) }
private func le64(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: value.littleEndian, Array.init) }

@Suite("Rejections")
struct RejectionTests {
    // MARK: frame level

    @Test("an oversized length is refused from its four bytes alone, before any payload arrives")
    func oversizedFromHeaderAlone() {
        var decoder = FrameDecoder(maxFrameLength: 1024)
        var header = ByteBuffer(bytes: le32(1025))
        #expect(throws: WireError.frameTooLarge(length: 1025, max: 1024)) {
            try decoder.decode(buffer: &header)
        }
        // Nothing was consumed, so nothing could have been sized from the length.
        #expect(header.readableBytes == 4)

        var huge = ByteBuffer(bytes: le32(.max))
        var defaultDecoder = FrameDecoder()
        #expect(throws: WireError.frameTooLarge(length: Int(UInt32.max), max: WireProtocol.defaultMaxFrameLength)) {
            try defaultDecoder.decode(buffer: &huge)
        }
    }

    @Test("through a pipeline, the error fires on the write that completes the length field")
    func oversizedInPipeline() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(FrameDecoder(maxFrameLength: 1 << 20)))
        let bytes = le32(64 << 20)
        #expect(try channel.writeInbound(ByteBuffer(bytes: Array(bytes[0..<3]))).isEmpty)
        #expect(throws: WireError.frameTooLarge(length: 64 << 20, max: 1 << 20)) {
            try channel.writeInbound(ByteBuffer(bytes: [bytes[3]]))
        }
        _ = try? channel.finish()
    }

    @Test("a length equal to the limit is accepted")
    func lengthAtLimit() throws {
        let message = WireMessage.goodbye(Goodbye(reason: String(repeating: "g", count: 100)))
        let frame = try Samples.frame(message)
        let length = frame.readableBytes - 4
        #expect(try Samples.decodeAll(frame, maxFrameLength: length) == [message])
        #expect(decodeError(frame, maxFrameLength: length - 1) == .frameTooLarge(length: length, max: length - 1))
    }

    @Test("length 0 is refused")
    func zeroLength() {
        #expect(decodeError(ByteBuffer(bytes: [0, 0, 0, 0])) == .emptyFrame)
        #expect(decodeError(ByteBuffer(bytes: [0, 0, 0, 0, 8, 1, 2, 3, 4])) == .emptyFrame)
    }

    @Test("an unknown type byte is refused as soon as it arrives", arguments: [UInt8(0), 14, 99, 255])
    func unknownType(type: UInt8) {
        var decoder = FrameDecoder()
        var buffer = ByteBuffer(bytes: le32(1000) + [type])  // payload not sent yet
        #expect(throws: WireError.unknownMessageType(type)) {
            try decoder.decode(buffer: &buffer)
        }
    }

    @Test("EOF inside a frame is reported")
    func eofMidFrame() throws {
        #expect(decodeError(ByteBuffer(bytes: [5, 0])) == .truncatedFrame(bufferedBytes: 2))
        var frame = try Samples.frame(.layerDone(LayerDone(layerIndex: 1)))
        frame.moveWriterIndex(to: frame.writerIndex - 1)
        #expect(decodeError(frame) == .truncatedFrame(bufferedBytes: 8))

        let channel = EmbeddedChannel(handler: ByteToMessageHandler(FrameDecoder()))
        try channel.writeInbound(frame)
        #expect(throws: WireError.truncatedFrame(bufferedBytes: 8)) { try channel.finish() }
    }

    // MARK: payload level

    @Test("every truncation of every payload is malformed")
    func truncatedPayloads() throws {
        for message in Samples.messages {
            if case .shard(let shard) = message, shard.compression != .uncompressed { continue }
            let payload = Samples.payloadBytes(message)
            for cut in 0..<payload.count {
                let frame = Samples.rawFrame(type: message.type.rawValue, payload: Array(payload[0..<cut]))
                let error = decodeError(frame)
                #expect(isMalformed(error, message.type), "\(message.type) cut at \(cut)/\(payload.count): \(String(describing: error))")
            }
        }
    }

    @Test("trailing bytes after the last field are malformed")
    func trailingGarbage() throws {
        for message in Samples.messages {
            if case .shard(let shard) = message, shard.compression != .uncompressed { continue }
            for extra in [[UInt8(0)], [1, 2, 3, 4, 5, 6, 7, 8]] {
                let frame = Samples.rawFrame(type: message.type.rawValue, payload: Samples.payloadBytes(message) + extra)
                let error = decodeError(frame)
                #expect(isMalformed(error, message.type), "\(message.type) + \(extra.count) bytes: \(String(describing: error))")
            }
        }
    }

    @Test("shard payload size must match rowCount × cols × dtype")
    func shardPayloadSize() throws {
        func shardPayload(rowCount: UInt32, cols: UInt64, dtype: UInt8, compression: UInt8 = 0, uncompressed: UInt64, bytes: Int) -> ByteBuffer {
            let header = le32(0) + le32(0) + le64(0) + le32(rowCount) + le64(0) + le64(cols) + [dtype, compression] + le64(uncompressed) + le64(0)
            return Samples.rawFrame(type: 6, payload: header + [UInt8](repeating: 0, count: bytes))
        }
        #expect(try Samples.decodeAll(shardPayload(rowCount: 2, cols: 3, dtype: 0, uncompressed: 24, bytes: 24)).count == 1)
        #expect(isMalformed(decodeError(shardPayload(rowCount: 2, cols: 3, dtype: 0, uncompressed: 24, bytes: 20)), .shard, containing: "payload is 20 bytes"))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 2, cols: 3, dtype: 0, uncompressed: 20, bytes: 20)), .shard, containing: "uncompressedBytes"))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 2, cols: 3, dtype: 1, uncompressed: 24, bytes: 24)), .shard))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 0, cols: 3, dtype: 0, uncompressed: 0, bytes: 0)), .shard, containing: "empty"))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 1, cols: 1, dtype: 3, uncompressed: 8, bytes: 8)), .shard, containing: "F64"))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 1, cols: 1, dtype: 4, uncompressed: 4, bytes: 4)), .shard, containing: "dtype"))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 1, cols: 1, dtype: 0, compression: 2, uncompressed: 4, bytes: 4)), .shard, containing: "compression"))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 2, cols: .max, dtype: 0, uncompressed: 0, bytes: 0)), .shard, containing: "overflows"))
        // Compressed: any non-empty payload, but uncompressedBytes must still match the shape.
        #expect(try Samples.decodeAll(shardPayload(rowCount: 2, cols: 3, dtype: 0, compression: 1, uncompressed: 24, bytes: 5)).count == 1)
        #expect(isMalformed(decodeError(shardPayload(rowCount: 2, cols: 3, dtype: 0, compression: 1, uncompressed: 24, bytes: 0)), .shard))
        #expect(isMalformed(decodeError(shardPayload(rowCount: 2, cols: 3, dtype: 0, compression: 1, uncompressed: 1 << 40, bytes: 5)), .shard))
        // rowStart + rowCount must not overflow.
        let header = le32(0) + le32(0) + le64(.max) + le32(1) + le64(0) + le64(1) + [0, 0] + le64(4) + le64(0)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 6, payload: header + [0, 0, 0, 0])), .shard, containing: "overflows"))
        // Nor colStart + cols.
        let columns = le32(0) + le32(0) + le64(0) + le32(1) + le64(.max) + le64(1) + [0, 0] + le64(4) + le64(0)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 6, payload: columns + [0, 0, 0, 0])), .shard, containing: "overflows"))
    }

    @Test("power payload size must match matrixRows × matrixCols × 4")
    func powerPayloadSize() {
        for type in [UInt8(9), 10] {
            let wireType = WireMessageType(rawValue: type)!
            let good = le32(1) + le32(0) + [0] + le32(2) + le32(3) + le32(1) + le32(0) + le32(2)
            #expect(decodeError(Samples.rawFrame(type: type, payload: good + [UInt8](repeating: 0, count: 24))) == nil)
            #expect(isMalformed(decodeError(Samples.rawFrame(type: type, payload: good + [UInt8](repeating: 0, count: 23))), wireType))
            let huge = le32(1) + le32(0) + [1] + le32(.max) + le32(.max) + le32(1) + le32(0) + le32(.max)
            #expect(isMalformed(decodeError(Samples.rawFrame(type: type, payload: huge + [0, 0, 0, 0])), wireType))
            // Spans: the rows carried, sorted, disjoint, within matrixRows; the payload is theirs only.
            let second = le32(1) + le32(0) + [0] + le32(4) + le32(3) + le32(1) + le32(2) + le32(4)
            #expect(decodeError(Samples.rawFrame(type: type, payload: second + [UInt8](repeating: 0, count: 24))) == nil)
            let outside = le32(1) + le32(0) + [0] + le32(2) + le32(3) + le32(1) + le32(1) + le32(3)
            #expect(isMalformed(decodeError(Samples.rawFrame(type: type, payload: outside + [UInt8](repeating: 0, count: 24))), wireType, containing: "row range"))
            let unordered = le32(1) + le32(0) + [0] + le32(4) + le32(1) + le32(2) + le32(2) + le32(3) + le32(0) + le32(1)
            #expect(isMalformed(decodeError(Samples.rawFrame(type: type, payload: unordered + [UInt8](repeating: 0, count: 8))), wireType, containing: "row range"))
            let none = le32(1) + le32(0) + [0] + le32(2) + le32(3) + le32(0)
            #expect(isMalformed(decodeError(Samples.rawFrame(type: type, payload: none)), wireType))
            let badSide = le32(1) + le32(0) + [2] + le32(1) + le32(1) + le32(1) + le32(0) + le32(1)
            #expect(isMalformed(decodeError(Samples.rawFrame(type: type, payload: badSide + [0, 0, 0, 0])), wireType, containing: "side"))
        }
    }

    @Test("strings must be UTF-8", arguments: [
        [UInt8(0xFF)], [0xC0, 0x80], [0xED, 0xA0, 0x80], [0xE6, 0xBC], [0x61, 0x80, 0x62], [0xF4, 0x90, 0x80, 0x80],
    ])
    func badUTF8(bytes: [UInt8]) {
        let hello = le16(1) + le16(bytes.count) + bytes + le64(1) + [UInt8](repeating: 0, count: 32)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 1, payload: hello)), .hello, containing: "UTF-8"))
        let begin = le32(0) + le32(0) + le16(bytes.count) + bytes
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 5, payload: begin)), .layerBegin, containing: "UTF-8"))
        let goodbye = le16(bytes.count) + bytes
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 13, payload: goodbye)), .goodbye, containing: "UTF-8"))
    }

    @Test("string limits and empties")
    func stringLimits() {
        func hello(_ id: [UInt8]) -> ByteBuffer {
            Samples.rawFrame(type: 1, payload: le16(1) + le16(id.count) + id + le64(1) + [UInt8](repeating: 0, count: 32))
        }
        #expect(decodeError(hello([UInt8](repeating: 0x61, count: 256))) == nil)
        #expect(isMalformed(decodeError(hello([UInt8](repeating: 0x61, count: 257))), .hello, containing: "limit 256"))
        #expect(isMalformed(decodeError(hello([])), .hello, containing: "empty"))
        let longName = [UInt8](repeating: 0x6E, count: 1025)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 5, payload: le32(0) + le16(1025) + longName)), .layerBegin, containing: "limit 1024"))
    }

    @Test("enum fields out of range are malformed")
    func badEnums() throws {
        func jobSpec(mode: UInt8 = 0, dtype: UInt8 = 0, compression: UInt8 = 0) -> ByteBuffer {
            let payload = le16(1) + le16(1) + [0x6A, mode] + le32(1) + le32(2) + le64(3) + le32(4) + le32(5)
                + [dtype, compression] + le32(0)
            return Samples.rawFrame(type: 3, payload: payload)
        }
        #expect(decodeError(jobSpec()) == nil)
        #expect(isMalformed(decodeError(jobSpec(mode: 3)), .jobSpec, containing: "mode"))
        #expect(isMalformed(decodeError(jobSpec(dtype: 3)), .jobSpec, containing: "F64"))
        #expect(isMalformed(decodeError(jobSpec(dtype: 7)), .jobSpec, containing: "payloadDType"))
        #expect(isMalformed(decodeError(jobSpec(compression: 2)), .jobSpec, containing: "compression"))
        for code in [0, 9, 0xFFFF] {
            #expect(isMalformed(decodeError(Samples.rawFrame(type: 11, payload: le16(code) + le16(0))), .error, containing: "code"))
        }
        let announce = le32(1) + le16(1) + [0x61] + le64(1) + le64(1) + [4] + le32(0)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 4, payload: announce)), .announce, containing: "sourceDType"))
        let zeroRows = le32(1) + le16(1) + [0x61] + le64(0) + le64(1) + [0] + le32(0)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 4, payload: zeroRows)), .announce, containing: "shape"))
        // A block outside the layer, or reversed, is malformed too.
        let outside = le32(1) + le16(1) + [0x61] + le64(4) + le64(4) + [0] + le32(1) + le64(0) + le64(5) + le64(0) + le64(4)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 4, payload: outside)), .announce, containing: "outside"))
        let reversed = le32(1) + le16(1) + [0x61] + le64(4) + le64(4) + [0] + le32(1) + le64(3) + le64(1) + le64(0) + le64(4)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 4, payload: reversed)), .announce, containing: "reversed"))
    }

    @Test("a list count larger than the frame can hold is refused before reserving memory")
    func countBombs() {
        let announce = le32(.max) + [UInt8](repeating: 0, count: 40)
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 4, payload: announce)), .announce, containing: "count"))
        let jobSpec = le16(1) + le16(1) + [0x6A, 0] + le32(1) + le32(2) + le64(3) + le32(4) + le32(5) + [0, 0] + le32(.max) + [0, 0]
        #expect(isMalformed(decodeError(Samples.rawFrame(type: 3, payload: jobSpec)), .jobSpec, containing: "count"))
    }

    // MARK: encoder side

    @Test("the encoder refuses invalid messages and writes nothing")
    func encoderValidates() throws {
        let invalid: [WireMessage] = [
            .hello(Hello(workerID: "", sessionNonce: 0)),
            .hello(Hello(workerID: String(repeating: "x", count: 257), sessionNonce: 0)),
            .layerBegin(LayerBegin(layerIndex: 0, name: String(repeating: "é", count: 513))),
            .jobSpec(JobSpec(jobID: "j", mode: .dense, rank: 1, sketchWidth: 2, seed: 0, powerIterations: 0,
                             rowsPerShard: 1, payloadDType: .f64, compression: .uncompressed)),
            .shard(Shard(layerIndex: 0, rowStart: 0, rowCount: 2, cols: 3, dtype: .f32, compression: .uncompressed,
                         uncompressedBytes: 24, payload: ByteBuffer(bytes: [UInt8](repeating: 0, count: 20)))),
            .powerReply(PowerReply(layerIndex: 0, round: 0, side: .range, matrixRows: 2, matrixCols: 2, values: [1, 2, 3])),
            .announce(Announce(layers: [LayerInfo(name: "l", rows: 0, cols: 4, sourceDType: .f32)])),
        ]
        for message in invalid {
            var out = ByteBuffer()
            #expect(throws: WireError.self) { try message.encodeFrame(into: &out) }
            #expect(out.readableBytes == 0)
        }
        let channel = EmbeddedChannel(handler: FrameWriter())
        #expect(throws: WireError.self) { try channel.writeOutbound(invalid[0]) }
        _ = try? channel.finish()
    }

    @Test("the encoder refuses frames above its limit")
    func encoderFrameLimit() throws {
        let shard = WireMessage.shard(Shard(layerIndex: 0, rowStart: 0, rowCount: 16, cols: 16, dtype: .f32,
                                            payload: ByteBuffer(float32LittleEndian: Samples.floats(256))))
        var out = ByteBuffer()
        #expect(throws: WireError.frameTooLarge(length: 1 + Shard.headerBytes + 1024, max: 1000)) {
            try shard.encodeFrame(into: &out, maxFrameLength: 1000)
        }
        let goodbye = WireMessage.goodbye(Goodbye(reason: String(repeating: "z", count: 100)))
        #expect(throws: WireError.frameTooLarge(length: 103, max: 50)) {
            try goodbye.encodeFrame(into: &out, maxFrameLength: 50)
        }
        #expect(out.readableBytes == 0)
        try shard.encodeFrame(into: &out, maxFrameLength: 4 + 1 + Shard.headerBytes + 1024)
        #expect(out.readableBytes == 4 + 1 + Shard.headerBytes + 1024)
    }

    @Test("free text is clamped at a character boundary instead of refused")
    func textClamp() throws {
        let long = String(repeating: "€", count: 2000)  // 3 bytes each
        let error = ErrorMessage(code: .internal, message: long)
        #expect(error.message.utf8.count == 4095)
        #expect(try Samples.decodeAll(try Samples.frame(.error(error))) == [.error(error)])
        #expect(Goodbye(reason: long).reason.utf8.count == 4095)
    }
}
