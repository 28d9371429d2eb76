import Testing
import LoRAGAFormats

struct CRC32CTests {
    @Test func knownVectors() {
        // Check value from the CRC catalogue (CRC-32/ISCSI) and RFC 3720 B.4.
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum([]) == 0)
    }

    @Test func continuationEqualsOneShot() {
        let bytes = Array("The quick brown fox jumps over the lazy dog".utf8)
        let split = CRC32C.checksum(Array(bytes[20...]), continuing: CRC32C.checksum(Array(bytes[..<20])))
        #expect(split == CRC32C.checksum(bytes))
    }
}
