import NIOCore

/// Reads the fields of one message's payload, turning every shortfall into
/// `WireError.malformed(type, reason)` that names the field.
struct PayloadReader {
    let type: WireMessageType
    private(set) var buffer: ByteBuffer

    init(_ type: WireMessageType, _ buffer: ByteBuffer) {
        self.type = type
        self.buffer = buffer
    }

    func malformed(_ reason: String) -> WireError {
        .malformed(type, reason)
    }

    mutating func integer<I: FixedWidthInteger>(_ field: StaticString, as: I.Type = I.self) throws(WireError) -> I {
        guard let value = buffer.readInteger(endianness: .little, as: I.self) else {
            throw malformed("truncated at \(field): needs \(MemoryLayout<I>.size) bytes, \(buffer.readableBytes) left")
        }
        return value
    }

    mutating func enumeration<E: RawRepresentable>(
        _ field: StaticString,
        as: E.Type = E.self
    ) throws(WireError) -> E where E.RawValue: FixedWidthInteger {
        let raw = try integer(field, as: E.RawValue.self)
        guard let value = E(rawValue: raw) else {
            throw malformed("\(field) has unknown value \(raw)")
        }
        return value
    }

    /// One byte naming a case of a LoRAGACore vocabulary enum.
    mutating func enumeration<E: WireCoded>(_ field: StaticString, as: E.Type = E.self) throws(WireError) -> E {
        let code = try integer(field, as: UInt8.self)
        guard let value = E(wireCode: code) else {
            throw malformed("\(field) has unknown value \(code)")
        }
        return value
    }

    /// `u16` byte count + UTF-8; the bound is checked before the bytes are read.
    mutating func string(_ field: StaticString, maxBytes: Int) throws(WireError) -> String {
        let count = Int(try integer(field, as: UInt16.self))
        guard count <= maxBytes else {
            throw malformed("\(field) is \(count) bytes, limit \(maxBytes)")
        }
        guard let view = buffer.readSlice(length: count)?.readableBytesView else {
            throw malformed("truncated in \(field): needs \(count) bytes, \(buffer.readableBytes) left")
        }
        // String(decoding:) repairs bad sequences with U+FFFD, so a repaired string
        // differs from its source exactly when the source was not valid UTF-8.
        let string = String(decoding: view, as: UTF8.self)
        guard string.utf8.elementsEqual(view) else {
            throw malformed("\(field) is not valid UTF-8")
        }
        return string
    }

    mutating func bytes32(_ field: StaticString) throws(WireError) -> Bytes32 {
        guard let view = buffer.readSlice(length: 32)?.readableBytesView else {
            throw malformed("truncated at \(field): needs 32 bytes, \(buffer.readableBytes) left")
        }
        return Bytes32(view)!
    }

    /// A `u32` element count, refused when the remaining bytes cannot hold that
    /// many elements of at least `minElementBytes` (so no caller reserves memory
    /// for a count it cannot receive).
    mutating func count(_ field: StaticString, minElementBytes: Int) throws(WireError) -> Int {
        let count = Int(try integer(field, as: UInt32.self))
        guard count <= buffer.readableBytes / minElementBytes else {
            throw malformed("\(field) is \(count), more than the \(buffer.readableBytes) remaining bytes can hold")
        }
        return count
    }

    /// The rest of the payload as a slice of the frame (no copy).
    mutating func rest() -> ByteBuffer {
        buffer.readSlice(length: buffer.readableBytes)!
    }

    /// Fails if bytes remain after the last field.
    func finish() throws(WireError) {
        guard buffer.readableBytes == 0 else {
            throw malformed("\(buffer.readableBytes) trailing bytes")
        }
    }
}

extension ByteBuffer {
    /// `u16` byte count + UTF-8. The caller has validated the length (see `WireMessageBody.validate()`).
    mutating func writeWireString(_ string: String) {
        let count = string.utf8.count
        precondition(count <= Int(UInt16.max), "wire string of \(count) bytes does not fit a u16 length")
        writeInteger(UInt16(count), endianness: .little)
        writeString(string)
    }

    mutating func writeLittleEndian<I: FixedWidthInteger>(_ value: I) {
        writeInteger(value, endianness: .little)
    }
}

/// Structural rules shared by encoding (`validate()`) and decoding.
enum FieldRule {
    static func name(
        _ value: String,
        _ field: StaticString,
        maxBytes: Int,
        allowEmpty: Bool = false,
        in type: WireMessageType
    ) throws(WireError) {
        let count = value.utf8.count
        if !allowEmpty && count == 0 {
            throw .malformed(type, "\(field) is empty")
        }
        if count > maxBytes {
            throw .malformed(type, "\(field) is \(count) bytes, limit \(maxBytes)")
        }
    }

    /// Free text is cut at the last whole character within `maxBytes` rather than refused.
    static func clampText(_ text: String, maxBytes: Int = WireProtocol.maxTextBytes) -> String {
        guard text.utf8.count > maxBytes else { return text }
        var result = ""
        var used = 0
        for character in text {
            let size = character.utf8.count
            if used + size > maxBytes { break }
            result.append(character)
            used += size
        }
        return result
    }
}
