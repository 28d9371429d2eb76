import CZstd

/// Why a zstd compression or decompression failed.
public struct ZstdError: Error, Sendable, CustomStringConvertible {
    public let description: String
}

/// Zstandard compression with reusable contexts (a small Swift surface over libzstd).
///
/// The class owns one compression and one decompression context, freed in
/// `deinit`; reusing them avoids re-allocating zstd's tables on every call.
/// Not `Sendable`: a zstd context must not be used by two threads at once.
public final class ZstdCodec {
    private let compressionContext: OpaquePointer
    private let decompressionContext: OpaquePointer

    public init() {
        guard let compression = ZSTD_createCCtx(), let decompression = ZSTD_createDCtx() else {
            fatalError("ZstdCodec: out of memory creating zstd contexts")
        }
        compressionContext = compression
        decompressionContext = decompression
    }

    deinit {
        ZSTD_freeCCtx(compressionContext)
        ZSTD_freeDCtx(decompressionContext)
    }

    /// Compresses `bytes` into one zstd frame that records its content size.
    /// - Parameter level: zstd level (1 fastest … 19+ smallest; negative = faster still).
    public func compress(_ bytes: UnsafeRawBufferPointer, level: Int32 = 3) throws -> [UInt8] {
        guard (ZSTD_minCLevel()...ZSTD_maxCLevel()).contains(level) else {
            throw ZstdError(description: "zstd level \(level) is outside \(ZSTD_minCLevel())...\(ZSTD_maxCLevel())")
        }
        // The frame carries zstd's own content checksum (4 bytes), so damage is caught even without an outer CRC.
        for (parameter, value) in [(ZSTD_c_compressionLevel, level), (ZSTD_c_checksumFlag, 1)] {
            let result = ZSTD_CCtx_setParameter(compressionContext, parameter, value)
            if ZSTD_isError(result) != 0 { throw ZstdError(description: "zstd parameter rejected: \(Self.errorName(result))") }
        }
        let bound = ZSTD_compressBound(bytes.count)
        var failure: ZstdError?
        let compressed = [UInt8](unsafeUninitializedCapacity: max(bound, 1)) { buffer, initialized in
            let result = ZSTD_compress2(compressionContext, buffer.baseAddress, buffer.count, bytes.baseAddress, bytes.count)
            if ZSTD_isError(result) != 0 {
                failure = ZstdError(description: "zstd compression failed: \(Self.errorName(result))")
                initialized = 0
            } else {
                initialized = result
            }
        }
        if let failure { throw failure }
        return compressed
    }

    /// Convenience for `[UInt8]` input.
    public func compress(_ bytes: [UInt8], level: Int32 = 3) throws -> [UInt8] {
        try bytes.withUnsafeBytes { buffer in try compress(buffer, level: level) }
    }

    /// Decompresses `bytes`, which must expand to exactly `expectedSize` bytes;
    /// never allocates more than `expectedSize`, whatever the frame claims.
    public func decompress(_ bytes: UnsafeRawBufferPointer, expectedSize: Int) throws -> [UInt8] {
        guard expectedSize >= 0 else { throw ZstdError(description: "expected size \(expectedSize) is negative") }
        let declared = ZSTD_getFrameContentSize(bytes.baseAddress, bytes.count)
        // ZSTD_CONTENTSIZE_ERROR / _UNKNOWN are (0ULL - 2) / (0ULL - 1); their macros do not import.
        if declared == UInt64.max - 1 {
            throw ZstdError(description: "data is not a zstd frame")
        }
        if declared != UInt64.max && declared != UInt64(expectedSize) {
            throw ZstdError(description: "zstd frame declares \(declared) bytes, expected \(expectedSize)")
        }
        var failure: ZstdError?
        let decompressed = [UInt8](unsafeUninitializedCapacity: max(expectedSize, 1)) { buffer, initialized in
            let result = ZSTD_decompressDCtx(decompressionContext, buffer.baseAddress, expectedSize, bytes.baseAddress, bytes.count)
            initialized = 0
            if ZSTD_isError(result) != 0 {
                failure = ZstdError(description: "zstd decompression failed: \(Self.errorName(result))")
            } else if result != expectedSize {
                failure = ZstdError(description: "zstd data expands to \(result) bytes, expected \(expectedSize)")
            } else {
                initialized = result
            }
        }
        if let failure { throw failure }
        return decompressed
    }

    /// Convenience for `[UInt8]` input.
    public func decompress(_ bytes: [UInt8], expectedSize: Int) throws -> [UInt8] {
        try bytes.withUnsafeBytes { buffer in try decompress(buffer, expectedSize: expectedSize) }
    }

    private static func errorName(_ code: Int) -> String {
        String(cString: ZSTD_getErrorName(code))
    }
}
