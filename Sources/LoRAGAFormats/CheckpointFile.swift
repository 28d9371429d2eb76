import Foundation
import LoRAGACore

/// One finished layer's LoRA-GA factors, as stored in a per-layer checkpoint.
///
/// File format, version 1 (all integers little-endian):
///
/// | offset      | size | field                                                       |
/// |-------------|------|-------------------------------------------------------------|
/// | 0           | 8    | magic, ASCII `LORAGACK`                                      |
/// | 8           | 2    | format version, u16 (= 1)                                   |
/// | 10          | 4    | header length H, u32 (≤ 16 MiB)                             |
/// | 14          | H    | header, UTF-8 JSON object (keys below)                      |
/// | 14 + H      | C    | payload: one zstd frame                                     |
/// | 14 + H + C  | 4    | CRC-32C (Castagnoli) u32 of bytes [0, 14 + H + C)           |
///
/// Header keys: `layer` (string), `out`, `in`, `rank` (ints), `dtype` (`"F32"`),
/// `direction`, `scale`, `mode` (strings), `seed` (u64), `singular_values`
/// (array of numbers), `fidelity` (number, absent when unknown),
/// `payload_bytes` P (uncompressed), `compressed_bytes` C, `zstd_level`,
/// `shuffle` (bool).
///
/// Payload, once decompressed (P bytes): `lora_A` [rank, in] then `lora_B`
/// [out, rank], row-major F32; when `shuffle` is true the P bytes were
/// byte-shuffled as a whole with element size 4 (`ByteShuffle`) before zstd.
///
/// The checksum covers everything before it, so a flipped bit anywhere, a
/// truncation or a stray append is detected before any field is trusted.
public struct CheckpointFile: Sendable, Equatable {
    /// The format version this build writes and reads.
    public static let formatVersion: UInt16 = 1
    /// First 8 bytes of every checkpoint.
    public static let magic = Array("LORAGACK".utf8)

    /// Module name of the layer, e.g. `encoder.layer.0.attention.self.query`.
    public var layer: String
    /// Rows of the layer's weight, `out` in PyTorch's [out, in].
    public var outFeatures: Int
    /// Columns of the layer's weight.
    public var inFeatures: Int
    /// LoRA rank r.
    public var rank: Int
    /// Which singular vectors went to which factor, as named by LoRAGACore (e.g. `ArB2r`).
    public var direction: String
    /// Scale scheme applied to the factors, as named by LoRAGACore (e.g. `stable`).
    public var scale: String
    /// Seed of the random test matrices, so a run can be reproduced.
    public var seed: UInt64
    /// Aggregation mode that produced the factors (stored as `dense`, `sketch`, `power`).
    public var mode: SVDMode
    /// Leading singular values of the summed gradient, largest first.
    public var singularValues: [Double]
    /// Estimated fidelity ratio (LoRA-GA's objective, optimum 1.0), when it was computed.
    public var fidelity: Double?
    /// `lora_A`, [rank, inFeatures] row-major.
    public var loraA: [Float]
    /// `lora_B`, [outFeatures, rank] row-major.
    public var loraB: [Float]

    public init(
        layer: String, outFeatures: Int, inFeatures: Int, rank: Int,
        direction: String, scale: String, seed: UInt64, mode: SVDMode,
        singularValues: [Double], fidelity: Double?, loraA: [Float], loraB: [Float]
    ) {
        self.layer = layer
        self.outFeatures = outFeatures
        self.inFeatures = inFeatures
        self.rank = rank
        self.direction = direction
        self.scale = scale
        self.seed = seed
        self.mode = mode
        self.singularValues = singularValues
        self.fidelity = fidelity
        self.loraA = loraA
        self.loraB = loraB
    }

    /// Bytes before the header: magic, version, header length.
    static let prefixLength = 14
    /// Bytes of the trailing checksum.
    static let checksumLength = 4
    /// Bound on the header so a corrupt length cannot trigger a huge allocation.
    static let maximumHeaderLength = 16 << 20

    /// Writes the checkpoint durably: temp file, fsync, rename onto `path`, fsync of the directory.
    /// - Parameters:
    ///   - zstdLevel: compression level; 3 is zstd's default trade-off.
    ///   - shuffle: byte-shuffle the floats before compression (smaller, costs one pass).
    /// - Throws: `CheckpointError` if the factors disagree with the shapes or on I/O failure.
    public func write(to path: String, zstdLevel: Int32 = 3, shuffle: Bool = true) throws {
        func fail(_ problem: String) -> CheckpointError { CheckpointError(path: path, problem: problem) }
        let (expectedA, expectedB) = try Self.factorCounts(out: outFeatures, in: inFeatures, rank: rank, fail: fail)
        guard loraA.count == expectedA else {
            throw fail("lora_A has \(loraA.count) values, expected rank × in = \(rank) × \(inFeatures) = \(expectedA)")
        }
        guard loraB.count == expectedB else {
            throw fail("lora_B has \(loraB.count) values, expected out × rank = \(outFeatures) × \(rank) = \(expectedB)")
        }

        // Explicitly little-endian (a no-op on every host we build for).
        var payload = (loraA + loraB).map { $0.bitPattern.littleEndian }.withUnsafeBytes { Array($0) }
        let payloadBytes = payload.count
        if shuffle { payload = payload.withUnsafeBytes { ByteShuffle.shuffle($0, elementSize: 4) } }
        let compressed: [UInt8]
        do {
            compressed = try ZstdCodec().compress(payload, level: zstdLevel)
        } catch {
            throw fail("cannot compress factors: \(error)")
        }

        let header = Header(
            layer: layer, out: outFeatures, in: inFeatures, rank: rank, dtype: .f32,
            direction: direction, scale: scale, seed: seed, mode: mode,
            singularValues: singularValues, fidelity: fidelity,
            payloadBytes: payloadBytes, compressedBytes: compressed.count,
            zstdLevel: Int(zstdLevel), shuffle: shuffle)
        let json: [UInt8]
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            json = Array(try encoder.encode(header))
        } catch {
            throw fail("cannot encode header (singular values and fidelity must be finite): \(error)")
        }
        guard json.count <= Self.maximumHeaderLength else {
            throw fail("header is \(json.count) bytes, over the \(Self.maximumHeaderLength)-byte limit")
        }

        var file = Self.magic
        file.reserveCapacity(Self.prefixLength + json.count + compressed.count + Self.checksumLength)
        file += withUnsafeBytes(of: Self.formatVersion.littleEndian, Array.init)
        file += withUnsafeBytes(of: UInt32(json.count).littleEndian, Array.init)
        file += json
        file += compressed
        file += withUnsafeBytes(of: CRC32C.checksum(file).littleEndian, Array.init)

        let temporaryPath = path + ".tmp"
        do {
            let output = try PosixFile.createForWriting(temporaryPath)
            try file.withUnsafeBytes { bytes in
                try output.write(from: bytes.baseAddress!, count: bytes.count, at: 0)
            }
            try output.sync()
            // `output` closes when it goes out of scope, before the rename.
        } catch {
            PosixFile.removeQuietly(temporaryPath)
            throw fail("cannot write \(temporaryPath): \(error)")
        }
        do {
            try PosixFile.publish(temporaryPath, as: path)
        } catch {
            PosixFile.removeQuietly(temporaryPath)
            throw fail("cannot publish checkpoint: \(error)")
        }
    }

    /// Reads and fully verifies a checkpoint.
    /// - Throws: `CheckpointError` naming the file and the problem: bad magic,
    ///   unsupported version, impossible lengths, checksum mismatch (any flipped
    ///   bit), truncation, undecodable payload, or factor sizes that disagree
    ///   with the header's shapes.
    public static func read(from path: String) throws -> CheckpointFile {
        func fail(_ problem: String) -> CheckpointError { CheckpointError(path: path, problem: problem) }
        let bytes = try readWholeFile(path, fail: fail)

        let minimumLength = prefixLength + checksumLength
        guard bytes.count >= minimumLength else {
            throw fail("file is \(bytes.count) bytes, shorter than the smallest checkpoint (\(minimumLength) bytes)")
        }
        guard Array(bytes[0..<8]) == magic else { throw fail("not a lora-ga checkpoint (bad magic)") }
        let version = UInt16(bytes[8]) | UInt16(bytes[9]) << 8
        guard version == formatVersion else {
            throw fail("format version \(version) is not supported (this build reads version \(formatVersion))")
        }
        let headerLength = Int(bytes[10]) | Int(bytes[11]) << 8 | Int(bytes[12]) << 16 | Int(bytes[13]) << 24
        guard headerLength <= maximumHeaderLength, headerLength <= bytes.count - minimumLength else {
            throw fail("header length \(headerLength) does not fit in the \(bytes.count)-byte file")
        }

        let body = bytes.count - checksumLength
        let stored = bytes[body...].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let computed = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[..<body])) }
        let headerBytes = bytes[prefixLength..<prefixLength + headerLength]
        let header = try? JSONDecoder().decode(Header.self, from: Data(headerBytes))

        let storedPayloadLength = body - prefixLength - headerLength
        guard stored == computed else {
            // When the header still reads, a size disagreement is the likelier story.
            if let header, header.compressedBytes != storedPayloadLength {
                let declared = prefixLength + headerLength + header.compressedBytes + checksumLength
                throw fail("file is \(bytes.count) bytes but its header describes \(declared) (truncated or appended to)")
            }
            throw fail("checksum mismatch: stored CRC-32C \(hex(stored)), computed \(hex(computed)) (file is corrupted)")
        }
        guard let header else {
            throw fail("header is not a valid checkpoint header: \(headerProblem(headerBytes))")
        }
        guard header.compressedBytes == storedPayloadLength else {
            throw fail("header declares \(header.compressedBytes) compressed bytes but the file holds \(storedPayloadLength)")
        }

        guard header.dtype == .f32 else { throw fail("factor dtype '\(header.dtype)' is not supported (expected F32)") }
        let (countA, countB) = try factorCounts(out: header.out, in: header.in, rank: header.rank, fail: fail)
        guard header.payloadBytes == (countA + countB) * 4 else {
            throw fail("header declares \(header.payloadBytes) payload bytes, but [\(header.rank), \(header.in)] + [\(header.out), \(header.rank)] F32 factors need \((countA + countB) * 4)")
        }

        var payload: [UInt8]
        do {
            payload = try bytes.withUnsafeBytes { raw in
                let compressed = UnsafeRawBufferPointer(rebasing: raw[(prefixLength + headerLength)..<body])
                return try ZstdCodec().decompress(compressed, expectedSize: header.payloadBytes)
            }
        } catch {
            throw fail("payload is corrupt: \(error)")
        }
        if header.shuffle { payload = payload.withUnsafeBytes { ByteShuffle.unshuffle($0, elementSize: 4) } }
        let factors = payload.withUnsafeBytes { raw in
            (0..<countA + countB).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self))) }
        }

        return CheckpointFile(
            layer: header.layer, outFeatures: header.out, inFeatures: header.in, rank: header.rank,
            direction: header.direction, scale: header.scale, seed: header.seed, mode: header.mode,
            singularValues: header.singularValues, fidelity: header.fidelity,
            loraA: Array(factors[..<countA]), loraB: Array(factors[countA...]))
    }

    // MARK: - Internals

    /// The JSON header; keys are snake_case for readers in other languages.
    private struct Header: Codable {
        var layer: String
        var out: Int
        var `in`: Int
        var rank: Int
        var dtype: TensorDType
        var direction: String
        var scale: String
        var seed: UInt64
        var mode: SVDMode
        var singularValues: [Double]
        var fidelity: Double?
        var payloadBytes: Int
        var compressedBytes: Int
        var zstdLevel: Int
        var shuffle: Bool

        enum CodingKeys: String, CodingKey {
            case layer, out, `in`, rank, dtype, direction, scale, seed, mode, fidelity, shuffle
            case singularValues = "singular_values"
            case payloadBytes = "payload_bytes"
            case compressedBytes = "compressed_bytes"
            case zstdLevel = "zstd_level"
        }
    }

    /// Element counts of A [rank, in] and B [out, rank], overflow-checked so the
    /// payload size cannot wrap around.
    private static func factorCounts(
        out: Int, in inFeatures: Int, rank: Int, fail: (String) -> CheckpointError
    ) throws(CheckpointError) -> (Int, Int) {
        guard out > 0, inFeatures > 0, rank > 0 else {
            throw fail("shape out=\(out), in=\(inFeatures), rank=\(rank) is not positive")
        }
        let (countA, overflowA) = rank.multipliedReportingOverflow(by: inFeatures)
        let (countB, overflowB) = out.multipliedReportingOverflow(by: rank)
        guard !overflowA, !overflowB, countA <= Int.max / 8 - countB else {
            throw fail("shape out=\(out), in=\(inFeatures), rank=\(rank) is too large")
        }
        return (countA, countB)
    }

    private static func readWholeFile(_ path: String, fail: (String) -> CheckpointError) throws(CheckpointError) -> [UInt8] {
        do {
            let file = try PosixFile.openForReading(path)
            let size = try file.size()
            var bytes = [UInt8](repeating: 0, count: size)
            let got = try bytes.withUnsafeMutableBytes { buffer in
                size == 0 ? 0 : try file.read(into: buffer.baseAddress!, count: size, at: 0)
            }
            return Array(bytes[..<got])
        } catch {
            throw fail("cannot read: \(error)")
        }
    }

    /// Names the decoding problem (missing key, wrong type) without the noise of `DecodingError`'s dump.
    private static func headerProblem(_ bytes: ArraySlice<UInt8>) -> String {
        do {
            _ = try JSONDecoder().decode(Header.self, from: Data(bytes))
            return "unknown"
        } catch let DecodingError.keyNotFound(key, _) {
            return "missing key '\(key.stringValue)'"
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.valueNotFound(_, context) {
            return "wrong type at '\(context.codingPath.map(\.stringValue).joined(separator: "."))'"
        } catch {
            return "not valid JSON"
        }
    }

    private static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
    }
}
