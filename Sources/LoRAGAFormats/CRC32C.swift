/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of
/// iSCSI, ext4 and Snappy framing; detects every 1-, 2- and 3-bit error and all
/// burst errors up to 32 bits, which is what a storage checksum is for.
public enum CRC32C {
    /// Checksum of `bytes`; pass a previous result as `crc` to continue it over more data.
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        var state = ~crc
        for byte in bytes {
            state = table[Int(UInt8(truncatingIfNeeded: state) ^ byte)] ^ (state >> 8)
        }
        return ~state
    }

    /// Convenience for `[UInt8]`.
    public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: crc) }
    }

    /// One byte of the bitwise algorithm, precomputed for all 256 values.
    private static let table: [UInt32] = (0..<256).map { index in
        var value = UInt32(index)
        for _ in 0..<8 {
            value = (value & 1) != 0 ? (value >> 1) ^ 0x82F6_3B78 : value >> 1
        }
        return value
    }
}
