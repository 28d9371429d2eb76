import Foundation
import Testing
import LoRAGACore
import LoRAGAFormats

/// Checkpoint round trips and detection of every kind of damage.
struct CheckpointFileTests {
    static func sample(fidelity: Double? = 1.0123, seed: UInt64 = .max) -> CheckpointFile {
        var random = SplitMix64(seed: 11)
        let (out, inFeatures, rank) = (12, 10, 3)
        return CheckpointFile(
            layer: "encoder.layer.0.attention.self.query/ü", outFeatures: out, inFeatures: inFeatures, rank: rank,
            direction: "ArB2r", scale: "stable", seed: seed, mode: .sketch,
            singularValues: [3.5, 2.25, 1.0 / 3.0, 0.1, 1e-300, 0],
            fidelity: fidelity,
            loraA: random.gaussians(rank * inFeatures), loraB: random.gaussians(out * rank, scale: 1e-3))
    }

    @Test(arguments: [(Int32(3), true), (1, false), (19, true)])
    func roundTrip(zstdLevel: Int32, shuffle: Bool) throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("layer.ckpt")
        for checkpoint in [Self.sample(), Self.sample(fidelity: nil, seed: 42)] {
            try checkpoint.write(to: path, zstdLevel: zstdLevel, shuffle: shuffle)
            #expect(try CheckpointFile.read(from: path) == checkpoint)
            #expect(!scratch.exists("layer.ckpt.tmp"))
        }
    }

    @Test func layoutMatchesTheDocumentedFormat() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("layer.ckpt")
        try Self.sample().write(to: path, zstdLevel: 3, shuffle: true)
        let bytes = readBytes(path)
        #expect(Array(bytes[0..<8]) == Array("LORAGACK".utf8))
        #expect(bytes[8] == 1 && bytes[9] == 0, "format version 1, little-endian")
        let headerLength = Int(bytes[10]) | Int(bytes[11]) << 8 | Int(bytes[12]) << 16 | Int(bytes[13]) << 24
        let header = try JSONSerialization.jsonObject(with: Data(bytes[14..<(14 + headerLength)])) as! [String: Any]
        #expect(header["layer"] as? String == "encoder.layer.0.attention.self.query/ü")
        #expect(header["dtype"] as? String == "F32")
        #expect(header["mode"] as? String == "sketch")
        #expect(header["payload_bytes"] as? Int == (3 * 10 + 12 * 3) * 4)
        let compressed = header["compressed_bytes"] as! Int
        #expect(bytes.count == 14 + headerLength + compressed + 4)
        let stored = bytes.suffix(4).reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        #expect(stored == CRC32C.checksum(Array(bytes.dropLast(4))))
    }

    /// Writes the sample and returns its path and bytes, for tests that damage it.
    func written(in scratch: ScratchDirectory) throws -> (String, [UInt8]) {
        let path = scratch.file("layer.ckpt")
        try Self.sample().write(to: path)
        return (path, readBytes(path))
    }

    func problem(reading bytes: [UInt8], at path: String) -> String? {
        writeBytes(bytes, to: path)
        let error = #expect(throws: CheckpointError.self) { try CheckpointFile.read(from: path) }
        #expect(error?.description.hasPrefix(path + ": ") == true)
        return error?.problem
    }

    @Test func everySingleBitFlipIsDetected() throws {
        let scratch = ScratchDirectory()
        let (path, original) = try written(in: scratch)
        for index in original.indices {
            var damaged = original
            damaged[index] ^= UInt8(1) << (index % 8)
            writeBytes(damaged, to: path)
            #expect(throws: CheckpointError.self, "bit flip at byte \(index)") { try CheckpointFile.read(from: path) }
        }
    }

    @Test func flipsInHeaderPayloadAndChecksumAreChecksumMismatches() throws {
        let scratch = ScratchDirectory()
        let (path, original) = try written(in: scratch)
        let headerLength = Int(original[10]) | Int(original[11]) << 8
        let layerNameByte = 14 + Array(String(decoding: original[14..<(14 + headerLength)], as: UTF8.self).utf8)
            .firstIndex(of: UInt8(ascii: "q"))!
        for (region, index) in [("header", layerNameByte), ("payload", 14 + headerLength + 10), ("checksum", original.count - 2)] {
            var damaged = original
            damaged[index] ^= 0x04
            let message = problem(reading: damaged, at: path)
            #expect(message?.hasPrefix("checksum mismatch: stored CRC-32C 0x") == true, "\(region): \(message ?? "no error")")
        }
    }

    @Test func damagedPrefixIsNamed() throws {
        let scratch = ScratchDirectory()
        let (path, original) = try written(in: scratch)
        var badMagic = original
        badMagic[0] = UInt8(ascii: "X")
        #expect(problem(reading: badMagic, at: path) == "not a lora-ga checkpoint (bad magic)")
        var badLength = original
        badLength[13] = 0x7F
        #expect(problem(reading: badLength, at: path) == "header length \(Int(original[10]) | Int(original[11]) << 8 | 0x7F00_0000) does not fit in the \(original.count)-byte file")
    }

    @Test func wrongVersionIsRejectedEvenWithAValidChecksum() throws {
        let scratch = ScratchDirectory()
        let (path, original) = try written(in: scratch)
        var future = Array(original.dropLast(4))
        future[8] = 2
        future += littleEndianBytes([CRC32C.checksum(future)])
        #expect(problem(reading: future, at: path) == "format version 2 is not supported (this build reads version 1)")
    }

    @Test func truncationAndAppendingAreDetected() throws {
        let scratch = ScratchDirectory()
        let (path, original) = try written(in: scratch)
        for length in 0..<original.count {
            writeBytes(Array(original[..<length]), to: path)
            #expect(throws: CheckpointError.self, "truncated to \(length) bytes") { try CheckpointFile.read(from: path) }
        }
        #expect(problem(reading: Array(original.dropLast(10)), at: path)
            == "file is \(original.count - 10) bytes but its header describes \(original.count) (truncated or appended to)")
        #expect(problem(reading: Array(original[..<5]), at: path) == "file is 5 bytes, shorter than the smallest checkpoint (18 bytes)")
        #expect(problem(reading: original + [0], at: path)
            == "file is \(original.count + 1) bytes but its header describes \(original.count) (truncated or appended to)")
    }

    @Test func writeRejectsInconsistentFactors() {
        let scratch = ScratchDirectory()
        let path = scratch.file("bad.ckpt")
        var checkpoint = Self.sample()
        checkpoint.loraA.removeLast()
        let wrongA = #expect(throws: CheckpointError.self) { try checkpoint.write(to: path) }
        #expect(wrongA?.problem == "lora_A has 29 values, expected rank × in = 3 × 10 = 30")

        checkpoint = Self.sample()
        checkpoint.singularValues = [.nan]
        #expect(throws: CheckpointError.self) { try checkpoint.write(to: path) }

        checkpoint = Self.sample()
        checkpoint.rank = 0
        let zeroRank = #expect(throws: CheckpointError.self) { try checkpoint.write(to: path) }
        #expect(zeroRank?.problem == "shape out=12, in=10, rank=0 is not positive")
        #expect(!scratch.exists("bad.ckpt") && !scratch.exists("bad.ckpt.tmp"))
    }

    @Test func missingFileNamesThePath() {
        let path = ScratchDirectory().file("absent.ckpt")
        let error = #expect(throws: CheckpointError.self) { try CheckpointFile.read(from: path) }
        #expect(error?.description.hasPrefix("\(path): cannot read: open failed: No such file or directory") == true)
    }
}
