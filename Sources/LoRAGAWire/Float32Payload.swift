import NIOCore

// Bulk conversion between F32 little-endian payload bytes and Swift floats.
// On little-endian hosts (every Linux target we build for) these are memcpy;
// the byte-swapping branches keep the code correct elsewhere.

extension ByteBuffer {
    /// A buffer holding `values` as F32 little-endian.
    public init(float32LittleEndian values: [Float]) {
        self = ByteBufferAllocator().buffer(capacity: values.count * 4)
        self.writeFloat32LittleEndian(values)
    }

    /// Number of whole F32 values in the readable bytes.
    public var readableFloat32Count: Int { readableBytes / 4 }

    /// Appends `values` as F32 little-endian; returns the bytes written.
    @discardableResult
    public mutating func writeFloat32LittleEndian(_ values: UnsafeBufferPointer<Float>) -> Int {
        #if _endian(little)
        return writeBytes(UnsafeRawBufferPointer(values))
        #else
        reserveCapacity(minimumWritableBytes: values.count * 4)
        for value in values {
            writeInteger(value.bitPattern, endianness: .little)
        }
        return values.count * 4
        #endif
    }

    /// Appends `values` as F32 little-endian; returns the bytes written.
    @discardableResult
    public mutating func writeFloat32LittleEndian(_ values: [Float]) -> Int {
        values.withUnsafeBufferPointer { writeFloat32LittleEndian($0) }
    }

    /// Copies `destination.count` F32 values starting at byte `index` into
    /// `destination`; `false` (nothing written) if those bytes are not readable.
    public func getFloat32LittleEndian(at index: Int, into destination: UnsafeMutableBufferPointer<Float>) -> Bool {
        guard let slice = getSlice(at: index, length: destination.count * 4) else { return false }
        slice.withUnsafeReadableBytes { source in
            #if _endian(little)
            UnsafeMutableRawBufferPointer(destination).copyMemory(from: source)
            #else
            for i in 0..<destination.count {
                let bits = source.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)
                destination[i] = Float(bitPattern: UInt32(littleEndian: bits))
            }
            #endif
        }
        return true
    }

    /// Reads `destination.count` F32 values into `destination`; `false` (reader
    /// index unchanged) if not enough bytes are readable.
    public mutating func readFloat32LittleEndian(into destination: UnsafeMutableBufferPointer<Float>) -> Bool {
        guard getFloat32LittleEndian(at: readerIndex, into: destination) else { return false }
        moveReaderIndex(forwardBy: destination.count * 4)
        return true
    }

    /// `count` F32 values starting at byte `index`, or `nil` if not readable.
    public func getFloat32LittleEndian(at index: Int, count: Int) -> [Float]? {
        let (byteCount, overflow) = count.multipliedReportingOverflow(by: 4)
        guard count >= 0, !overflow, getSlice(at: index, length: byteCount) != nil else { return nil }
        return [Float](unsafeUninitializedCapacity: count) { storage, initialized in
            _ = getFloat32LittleEndian(at: index, into: storage)
            initialized = count
        }
    }

    /// Reads `count` F32 values, or `nil` (reader index unchanged) if not enough bytes are readable.
    public mutating func readFloat32LittleEndian(count: Int) -> [Float]? {
        guard let values = getFloat32LittleEndian(at: readerIndex, count: count) else { return nil }
        moveReaderIndex(forwardBy: count * 4)
        return values
    }
}
