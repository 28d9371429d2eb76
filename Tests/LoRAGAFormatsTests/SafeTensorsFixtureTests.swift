import Testing
import LoRAGAFormats

/// The real BF16 gradients of two MiniLM encoder layers (see the fixture's README).
struct SafeTensorsFixtureTests {
    static let worker0 = fixturePath("w0/grads.safetensors")
    static let worker1 = fixturePath("w1/grads.safetensors")
    static let query = "encoder.layer.0.attention.self.query.weight"

    @Test func listsTwelveBFloat16Weights() throws {
        let file = try SafeTensorsFile(path: Self.worker0)
        #expect(file.metadata == ["format": "pt"])
        #expect(file.tensors.count == 12)
        #expect(file.tensors.allSatisfy { $0.dtype == .bf16 })
        for info in file.tensors {
            let expected = switch info.name {
            case _ where info.name.hasSuffix("intermediate.dense.weight"): [1536, 384]
            case _ where info.name.hasSuffix(".output.dense.weight") && !info.name.contains("attention"): [384, 1536]
            default: [384, 384]
            }
            #expect(info.shape == expected, "\(info.name)")
        }
        #expect(file.tensors.map(\.name) == file.tensors.map(\.name).sorted())
    }

    @Test func rowBlocksMatchNumPy() throws {
        // Reference values computed with numpy from the raw BF16 bytes.
        let file = try SafeTensorsFile(path: Self.worker0)
        var block = [Float](repeating: 0, count: 3 * 384)
        try block.withUnsafeMutableBufferPointer { try file.readRows(Self.query, rows: 100..<103, into: $0) }
        #expect(bits(Array(block[..<4])) == [0xBA20_0000, 0xB8CD_0000, 0xB90D_0000, 0x38AA_0000])
        let sum = block.reduce(0.0) { $0 + Double($1) }
        #expect(abs(sum - -0.0007337033748626709) < 1e-15)
    }

    @Test func addRowsSumsWorkersInPlace() throws {
        let first = try SafeTensorsFile(path: Self.worker0)
        let second = try SafeTensorsFile(path: Self.worker1)
        var block = [Float](repeating: 0, count: 3 * 384)
        try block.withUnsafeMutableBufferPointer { try first.readRows(Self.query, rows: 100..<103, into: $0) }
        try block.withUnsafeMutableBufferPointer { try second.addRows(Self.query, rows: 100..<103, into: $0) }
        #expect(bits(Array(block[..<4])) == [0xBA6B_8000, 0xB983_C000, 0xB94E_8000, 0xB9BD_8000])
        let sum = block.reduce(0.0) { $0 + Double($1) }
        #expect(abs(sum - -0.0011228248476982117) < 1e-15)

        let whole = zip(try first.readAll(Self.query), try second.readAll(Self.query)).map { $0 + $1 }
        #expect(block == Array(whole[(100 * 384)..<(103 * 384)]))
    }
}
