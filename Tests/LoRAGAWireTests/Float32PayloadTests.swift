import LoRAGACore
import LoRAGAWire
import NIOCore
import Testing

@Suite("F32 payloads and byte counts")
struct Float32PayloadTests {
    @Test("layout is IEEE-754 binary32 little-endian")
    func layout() {
        let buffer = ByteBuffer(float32LittleEndian: [1.0, -2.0])
        #expect(Array(buffer.readableBytesView) == [0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0])
    }

    @Test("bit-exact round trip, special values included")
    func roundTrip() {
        let values: [Float] = [0, -0.0, .infinity, -.infinity, .leastNonzeroMagnitude, .greatestFiniteMagnitude,
                               Float(bitPattern: 0x7FC0_1234), 3.14159]
        var buffer = ByteBuffer()
        #expect(buffer.writeFloat32LittleEndian(values) == 32)
        #expect(buffer.readableFloat32Count == 8)
        let back = buffer.getFloat32LittleEndian(at: buffer.readerIndex, count: 8)!
        #expect(back.map(\.bitPattern) == values.map(\.bitPattern))

        var destination = [Float](repeating: 9, count: 8)
        let ok = destination.withUnsafeMutableBufferPointer { buffer.readFloat32LittleEndian(into: $0) }
        #expect(ok)
        #expect(destination.map(\.bitPattern) == values.map(\.bitPattern))
        #expect(buffer.readableBytes == 0)
    }

    @Test("short buffers give nil/false and leave the reader index alone")
    func shortBuffers() {
        var buffer = ByteBuffer(float32LittleEndian: [1, 2, 3])
        buffer.moveReaderIndex(forwardBy: 1)
        #expect(buffer.readFloat32LittleEndian(count: 3) == nil)
        var destination = [Float](repeating: 0, count: 3)
        let ok = destination.withUnsafeMutableBufferPointer { buffer.readFloat32LittleEndian(into: $0) }
        #expect(!ok)
        #expect(destination == [0, 0, 0])
        #expect(buffer.readerIndex == 1)
        #expect(buffer.getFloat32LittleEndian(at: 0, count: 1) == nil)  // before the reader index
        #expect(buffer.getFloat32LittleEndian(at: 1, count: -1) == nil)
        #expect(buffer.getFloat32LittleEndian(at: 1, count: .max) == nil)
        #expect(buffer.readFloat32LittleEndian(count: 0) == [])
    }

    @Test("reads work at unaligned offsets")
    func unaligned() {
        var buffer = ByteBuffer(bytes: [7])
        buffer.writeFloat32LittleEndian(Samples.floats(100))
        buffer.moveReaderIndex(forwardBy: 1)
        #expect(buffer.readFloat32LittleEndian(count: 100) == Samples.floats(100))
    }

    @Test("payloadByteCount multiplies with overflow checks")
    func byteCounts() {
        #expect(payloadByteCount(rows: 4096, cols: 11008, dtype: .bf16) == 4096 * 11008 * 2)
        #expect(payloadByteCount(rows: 3, cols: 5, dtype: .f32) == 60)
        #expect(payloadByteCount(rows: 3, cols: 5, dtype: .f64) == 120)
        #expect(payloadByteCount(rows: 0, cols: 5, dtype: .f16) == 0)
        #expect(payloadByteCount(rows: UInt64.max, cols: 2, dtype: .f32) == nil)
        #expect(payloadByteCount(rows: UInt64(1) << 32, cols: UInt64(1) << 30, dtype: .f32) == nil)  // 2^64
        #expect(payloadByteCount(rows: UInt64(1) << 31, cols: UInt64(1) << 30, dtype: .f32) == nil)  // 2^63 > Int.max
        #expect(payloadByteCount(rows: UInt32.max, cols: UInt32.max, dtype: .f32) == nil)
        #expect(payloadByteCount(rows: -1, cols: 5, dtype: .f32) == nil)
        #expect(payloadByteCount(rows: Int.max / 4, cols: 1, dtype: .f32) == (Int.max / 4) * 4)
    }

    @Test("dtype widths and payload eligibility")
    func dtypes() {
        #expect(TensorDType.allCases.map(\.byteSize) == [4, 2, 2, 8])
        #expect(TensorDType.allCases.filter(\.isPayloadType) == [.f32, .bf16, .f16])
        #expect(TensorDType.allCases.map(\.wireCode) == [0, 1, 2, 3])
    }
}
