import LoRAGAWire
import LoRAGACore
import NIOCore

/// SplitMix64: a tiny fixed-seed generator so every test run sees the same bytes.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

enum Samples {
    static func floats(_ count: Int, offset: Float = 0) -> [Float] {
        (0..<count).map { Float($0) * 0.25 - 3 + offset }
    }

    static func bytes(_ count: Int, seed: UInt64) -> [UInt8] {
        var rng = SplitMix64(seed: seed)
        return (0..<count).map { _ in UInt8.random(in: .min ... .max, using: &rng) }
    }

    /// At least one message of every type, with edge cases (unicode, limits, empties).
    static var messages: [WireMessage] {
        var rng = SplitMix64(seed: 7)
        // A shard payload that is a slice with a non-zero reader index.
        var offsetBuffer = ByteBuffer(bytes: [9, 9, 9])
        offsetBuffer.writeFloat32LittleEndian(floats(6))
        offsetBuffer.moveReaderIndex(forwardBy: 3)

        return [
            .hello(Hello(workerID: "worker-0", sessionNonce: 0x0123_4567_89AB_CDEF)),
            .hello(Hello(
                protocolVersion: 7, workerID: "wörker-漢字-🙂", sessionNonce: .max,
                authProof: .random(using: &rng))),
            .hello(Hello(workerID: String(repeating: "w", count: WireProtocol.maxIDBytes), sessionNonce: 0)),
            .challenge(Challenge(nonce: .random(using: &rng))),
            .challenge(Challenge(nonce: .zero)),
            .jobSpec(JobSpec(
                jobID: "job-1", mode: .sketch, rank: 8, sketchWidth: 26, seed: 42, powerIterations: 2,
                rowsPerShard: 512, payloadDType: .f32, compression: .uncompressed)),
            .jobSpec(JobSpec(
                protocolVersion: 1, jobID: "j", mode: .power, rank: .max, sketchWidth: .max, seed: .max,
                powerIterations: .max, rowsPerShard: .max, payloadDType: .bf16, compression: .zstdShuffled,
                skipLayers: ["model.layers.0.self_attn.q_proj", "ü", String(repeating: "n", count: WireProtocol.maxLayerNameBytes)])),
            .jobSpec(JobSpec(
                jobID: "dense", mode: .dense, rank: 1, sketchWidth: 2, seed: 0, powerIterations: 0,
                rowsPerShard: 1, payloadDType: .f16, compression: .uncompressed, skipLayers: [])),
            .announce(Announce(layers: [])),
            .announce(Announce(layers: [
                LayerInfo(name: "model.layers.0.mlp.up_proj", rows: 11008, cols: 4096, sourceDType: .bf16),
                LayerInfo(name: "lm_head", rows: 32000, cols: 4096, sourceDType: .f32),
                LayerInfo(name: "x", rows: .max, cols: 1, sourceDType: .f64),
                LayerInfo(name: "half", rows: 1, cols: .max, sourceDType: .f16),
                LayerInfo(name: "blocks", rows: 8, cols: 6, sourceDType: .f32,
                          regions: [LayerRegion(rows: 0..<4, cols: 0..<6), LayerRegion(rows: 4..<8, cols: 2..<5)]),
            ])),
            .layerBegin(LayerBegin(layerIndex: 0, name: "model.layers.0.self_attn.q_proj")),
            .layerBegin(LayerBegin(layerIndex: .max, name: "ñ")),
            .shard(Shard(layerIndex: 3, rowStart: 128, rowCount: 2, cols: 3, dtype: .f32,
                         payload: ByteBuffer(float32LittleEndian: floats(6)))),
            .shard(Shard(layerIndex: 3, rowStart: 0, rowCount: 2, cols: 3, dtype: .f32, payload: offsetBuffer)),
            .shard(Shard(layerIndex: 1, rowStart: .max - 4, rowCount: 4, cols: 5, dtype: .bf16,
                         payload: ByteBuffer(bytes: bytes(40, seed: 1)))),
            .shard(Shard(layerIndex: 2, rowStart: 10, rowCount: 1, cols: 1, dtype: .f16,
                         payload: ByteBuffer(bytes: [0x00, 0x3C]))),
            .shard(Shard(layerIndex: 5, rowStart: 4, rowCount: 2, cols: 3, dtype: .f32,
                         payload: ByteBuffer(float32LittleEndian: floats(6)), colStart: 2)),
            .shard(Shard(layerIndex: 9, rowStart: 64, rowCount: 64, cols: 4096, dtype: .bf16,
                         compression: .zstdShuffled, uncompressedBytes: 64 * 4096 * 2,
                         payload: ByteBuffer(bytes: bytes(37, seed: 2)))),
            .layerCommit(LayerCommit(layerIndex: 3, shardCount: 2, rowCount: 256, checksum: 0xDEAD_BEEF_F00D_CAFE)),
            .layerCommit(LayerCommit(layerIndex: .max, shardCount: .max, rowCount: .max, checksum: .max)),
            .layerDone(LayerDone(layerIndex: 0)),
            .layerDone(LayerDone(layerIndex: 123_456)),
            .powerRequest(PowerRequest(layerIndex: 4, round: 0, side: .range, matrixRows: 3, matrixCols: 2, values: floats(6))),
            .powerRequest(PowerRequest(layerIndex: 4, round: 1, side: .corange, matrixRows: 1, matrixCols: 1, values: [-0.0])),
            .powerReply(PowerReply(layerIndex: 4, round: 0, side: .range, matrixRows: 2, matrixCols: 4, values: floats(8, offset: 1))),
            .powerReply(PowerReply(layerIndex: 4, round: 5, side: .corange, matrixRows: 4, matrixCols: 2, values: floats(8, offset: 2))),
            .powerReply(PowerReply(layerIndex: 4, round: 2, side: .range, matrixRows: 9, matrixCols: 2, spans: [1..<3, 7..<9], values: floats(8, offset: 3))),
            .powerRequest(PowerRequest(layerIndex: 4, round: 2, side: .corange, matrixRows: 5, matrixCols: 1, spans: [4..<5], values: [2.5])),
        ]
            + WireErrorCode.allCases.map { .error(ErrorMessage(code: $0, message: "because \($0) ✗")) }
            + [
                .error(ErrorMessage(code: .internal, message: "")),
                .jobDone(JobDone(adapterPath: "/out/adapter/adapter_model.safetensors", layers: 224)),
                .jobDone(JobDone(adapterPath: "", layers: 0)),
                .goodbye(Goodbye(reason: "")),
                .goodbye(Goodbye(reason: "finished — 再见")),
            ]
    }

    /// The frame the encoder produces for `message`.
    static func frame(_ message: WireMessage) throws -> ByteBuffer {
        var buffer = ByteBuffer()
        try message.encodeFrame(into: &buffer)
        return buffer
    }

    /// A hand-made frame: `length` defaults to the honest count.
    static func rawFrame(type: UInt8, payload: [UInt8], length: UInt32? = nil) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(length ?? UInt32(payload.count + 1), endianness: .little)
        buffer.writeInteger(type)
        buffer.writeBytes(payload)
        return buffer
    }

    /// The payload bytes of an encoded message (no length, no type).
    static func payloadBytes(_ message: WireMessage) -> [UInt8] {
        var buffer = ByteBuffer()
        message.encodePayload(into: &buffer)
        return Array(buffer.readableBytesView)
    }

    /// Feeds `bytes` to a fresh decoder, then signals EOF; all messages it produced.
    static func decodeAll(_ bytes: ByteBuffer, maxFrameLength: Int = WireProtocol.defaultMaxFrameLength) throws(WireError) -> [WireMessage] {
        var decoder = FrameDecoder(maxFrameLength: maxFrameLength)
        var buffer = bytes
        var messages: [WireMessage] = []
        while let message = try decoder.decode(buffer: &buffer) {
            messages.append(message)
        }
        while let message = try decoder.decodeLast(buffer: &buffer, seenEOF: true) {
            messages.append(message)
        }
        return messages
    }
}
