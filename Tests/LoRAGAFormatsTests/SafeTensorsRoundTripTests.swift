import Foundation
import Testing
import LoRAGACore
import LoRAGAFormats

/// Writer → reader round trips and the writer's on-disk layout.
struct SafeTensorsRoundTripTests {
    /// Values that exercise rounding: ordinary numbers plus BF16/F16 edge cases.
    static let edgeValues: [Float] = [
        0, -0.0, 1, -1, 0.1, 1e-3, 65504, 65520, 1e-8, 0x1p-24, 0x1p-25, Float(bitPattern: 0x0001_16C2),
        Float.greatestFiniteMagnitude, .leastNonzeroMagnitude, .infinity, -.infinity, .nan,
        1 + 0x1p-8, 1 + 0x3p-8, 3.14159265,
    ]

    @Test(arguments: [TensorDType.f32, .bf16, .f16])
    func roundTripMatchesTheDtypesRounding(dtype: TensorDType) throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("t.safetensors")
        var random = SplitMix64(seed: 7)
        let matrix = random.gaussians(6 * 5)
        let edges = Self.edgeValues
        try SafeTensorsWriter.write(path: path, tensors: [
            (.init(name: "m", dtype: dtype, shape: [6, 5]), matrix),
            (.init(name: "edges", dtype: dtype, shape: [edges.count]), edges),
        ], metadata: ["format": "pt"])

        let file = try SafeTensorsFile(path: path)
        #expect(file.metadata == ["format": "pt"])
        #expect(file.tensors.map(\.name) == ["edges", "m"])
        #expect(file.tensor(named: "m")?.shape == [6, 5])
        #expect(file.tensor(named: "m")?.dtype == dtype)
        #expect(bits(try file.readAll("m")) == bits(matrix.map { Self.rounded($0, to: dtype) }))

        let readEdges = try file.readAll("edges")
        for (value, read) in zip(edges, readEdges) {
            if value.isNaN {
                #expect(read.isNaN)
            } else {
                #expect(read.bitPattern == Self.rounded(value, to: dtype).bitPattern, "\(value) as \(dtype)")
            }
        }
    }

    /// Independent reference rounding: Float16's conversion, and for BF16 the
    /// nearest of the two truncation neighbours (ties to the even one).
    static func rounded(_ value: Float, to dtype: TensorDType) -> Float {
        switch dtype {
        case .f16:
            return Float(Float16(value))
        case .bf16:
            let down = Float(bitPattern: value.bitPattern & 0xFFFF_0000)
            let up = Float(bitPattern: (value.bitPattern & 0xFFFF_0000) &+ 0x1_0000)
            if value == down || value.isInfinite { return down }
            // Past the largest finite BF16 the next step up is 2^128, which IEEE rounds to infinity.
            let upValue = up.isInfinite ? (value.sign == .minus ? -0x1p128 : 0x1p128) : Double(up)
            let (distanceDown, distanceUp) = (abs(Double(value) - Double(down)), abs(upValue - Double(value)))
            if distanceDown != distanceUp { return distanceDown < distanceUp ? down : up }
            return (down.bitPattern >> 16) & 1 == 0 ? down : up
        default:
            return value
        }
    }

    @Test func f64FileWrittenByHandIsRoundedToFloat() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("f64.safetensors")
        let values: [Double] = [1.0 / 3.0, -2.5, 1e300, -1e300, 1e-50, 1e-40, -0.0, .nan, .infinity, 0.1 + 0x1p-30]
        let header = #"{"d":{"dtype":"F64","shape":[2,5],"data_offsets":[0,80]}}"#
        writeBytes(handMadeSafeTensors(header: header, data: littleEndianBytes(values.map(\.bitPattern))), to: path)

        let file = try SafeTensorsFile(path: path)
        let read = try file.readAll("d")
        for (value, got) in zip(values, read) {
            if value.isNaN { #expect(got.isNaN) } else { #expect(got.bitPattern == Float(value).bitPattern, "\(value)") }
        }
        var row = [Float](repeating: 0, count: 5)
        try row.withUnsafeMutableBufferPointer { try file.readRows("d", rows: 1..<2, into: $0) }
        #expect(bits(row) == bits(values[5...].map { Float($0) }))
    }

    @Test func everyF16AndBF16PatternReadsExactly() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("all.safetensors")
        let patterns = Array(UInt16.min...UInt16.max)
        let header = #"{"bf":{"dtype":"BF16","shape":[65536],"data_offsets":[0,131072]},"h":{"dtype":"F16","shape":[256,256],"data_offsets":[131072,262144]}}"#
        let data = littleEndianBytes(patterns) + littleEndianBytes(patterns)
        writeBytes(handMadeSafeTensors(header: header, data: data), to: path)

        let file = try SafeTensorsFile(path: path)
        #expect(bits(try file.readAll("bf")) == patterns.map { UInt32($0) << 16 })
        #expect(bits(try file.readAll("h")) == patterns.map { Float(Float16(bitPattern: $0)).bitPattern })
    }

    @Test func readRowsAndAddRowsOnSubRanges() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("rows.safetensors")
        let (rows, columns) = (7, 5)
        let matrix = (0..<rows * columns).map { Float($0) }
        try SafeTensorsWriter.write(path: path, tensors: [
            (.init(name: "f32", dtype: .f32, shape: [rows, columns]), matrix),
            (.init(name: "bf16", dtype: .bf16, shape: [rows, columns]), matrix),
            (.init(name: "vector", dtype: .f16, shape: [rows]), (0..<rows).map(Float.init)),
        ])
        let file = try SafeTensorsFile(path: path)

        for name in ["f32", "bf16"] {
            var block = [Float](repeating: -1, count: 3 * columns + 2)
            try block.withUnsafeMutableBufferPointer { try file.readRows(name, rows: 2..<5, into: $0) }
            #expect(Array(block[..<(3 * columns)]) == Array(matrix[(2 * columns)..<(5 * columns)]))
            #expect(block.suffix(2) == [-1, -1], "only rows.count × columns elements are written")

            try block.withUnsafeMutableBufferPointer { try file.addRows(name, rows: 4..<7, into: $0) }
            let expected = (0..<(3 * columns)).map { matrix[2 * columns + $0] + matrix[4 * columns + $0] }
            #expect(Array(block[..<(3 * columns)]) == expected)

            try block.withUnsafeMutableBufferPointer { try file.readRows(name, rows: 3..<3, into: $0) }
            #expect(Array(block[..<(3 * columns)]) == expected, "an empty range leaves the destination alone")
        }

        var elements = [Float](repeating: 0, count: 2)
        try elements.withUnsafeMutableBufferPointer { try file.readRows("vector", rows: 5..<7, into: $0) }
        #expect(elements == [5, 6], "a 1-D tensor has one element per row")
    }

    @Test func readRowsRejectsBadRequests() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("bad.safetensors")
        let header = #"{"m":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"s":{"dtype":"F32","shape":[],"data_offsets":[24,28]}}"#
        writeBytes(handMadeSafeTensors(header: header, data: [UInt8](repeating: 0, count: 28)), to: path)
        let file = try SafeTensorsFile(path: path)
        #expect(try file.readAll("s") == [0], "a scalar reads as one element")

        var buffer = [Float](repeating: 0, count: 6)
        func message(_ body: (UnsafeMutableBufferPointer<Float>) throws -> Void) -> String? {
            let error = #expect(throws: SafeTensorsError.self) { try buffer.withUnsafeMutableBufferPointer { try body($0) } }
            return error?.problem
        }
        #expect(message { try file.readRows("missing", rows: 0..<1, into: $0) } == "no tensor named 'missing'")
        #expect(message { try file.readRows("m", rows: 1..<3, into: $0) } == "rows 1..<3 are outside tensor 'm' with 2 rows")
        #expect(message { try file.readRows("s", rows: 0..<1, into: $0) } == "tensor 's' is a scalar and has no rows; use readAll")
        #expect(message { try file.addRows("m", rows: 0..<2, into: UnsafeMutableBufferPointer(rebasing: $0[..<5])) }
            == "destination holds 5 floats but rows 0..<2 of 'm' need 6")
    }

    @Test func largeRowBlocksCrossStagingChunks() throws {
        // 1100 × 2000 BF16 = 4.4 MB: more than the 4 MiB staging bound, so one request spans chunks.
        let scratch = ScratchDirectory()
        let path = scratch.file("large.safetensors")
        let (rows, columns) = (1100, 2000)
        // Exact in BF16; the prime period keeps a misplaced chunk from lining up by accident.
        let matrix = (0..<rows * columns).map { Float($0 % 251 - 125) * 0.5 }
        let writer = try SafeTensorsWriter(path: path, tensors: [.init(name: "g", dtype: .bf16, shape: [rows, columns])])
        for start in stride(from: 0, to: rows, by: 300) {
            let block = start..<min(start + 300, rows)
            try matrix[(block.lowerBound * columns)..<(block.upperBound * columns)].withUnsafeBufferPointer {
                try writer.write("g", rows: block, values: $0)
            }
        }
        try writer.finish()

        let file = try SafeTensorsFile(path: path)
        var block = [Float](repeating: 0, count: 1080 * columns)
        try block.withUnsafeMutableBufferPointer { try file.readRows("g", rows: 10..<1090, into: $0) }
        #expect(block == Array(matrix[(10 * columns)..<(1090 * columns)]))
        try block.withUnsafeMutableBufferPointer { try file.addRows("g", rows: 10..<1090, into: $0) }
        #expect(block == matrix[(10 * columns)..<(1090 * columns)].map { $0 + $0 })
    }

    @Test func headerIsSortedPaddedAndContiguousInDeclarationOrder() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("layout.safetensors")
        try SafeTensorsWriter.write(path: path, tensors: [
            (.init(name: "zeta/w", dtype: .f32, shape: [1, 3]), [1, 2, 3]),
            (.init(name: "alpha", dtype: .bf16, shape: [3]), [1, 2, 3]),
        ], metadata: ["format": "pt"])

        let bytes = readBytes(path)
        let length = Int(bytes[..<8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        #expect(length % 8 == 0)
        #expect(bytes.count == 8 + length + 12 + 6)
        let json = String(decoding: bytes[8..<(8 + length)], as: UTF8.self)
        let trimmed = String(json.reversed().drop { $0 == " " }.reversed())
        #expect(trimmed == #"{"__metadata__":{"format":"pt"},"alpha":{"data_offsets":[12,18],"dtype":"BF16","shape":[3]},"zeta/w":{"data_offsets":[0,12],"dtype":"F32","shape":[1,3]}}"#)
        #expect(json.count - trimmed.count < 8, "padding only up to the next multiple of 8")
    }

    @Test func streamingWriterEnforcesOrderAndCompleteness() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("stream.safetensors")
        let writer = try SafeTensorsWriter(path: path, tensors: [
            .init(name: "a", dtype: .f32, shape: [4, 2]),
            .init(name: "b", dtype: .f16, shape: [2, 2]),
        ], metadata: [:])
        let values: [Float] = [1, 2, 3, 4]
        try values.withUnsafeBufferPointer { try writer.write("a", rows: 0..<2, values: $0) }
        // Tensors may interleave; each tensor's rows must come in order.
        try values.withUnsafeBufferPointer { try writer.write("b", rows: 0..<2, values: $0) }
        let outOfOrder = #expect(throws: SafeTensorsError.self) {
            try values.withUnsafeBufferPointer { try writer.write("a", rows: 3..<4, values: UnsafeBufferPointer(rebasing: $0[..<2])) }
        }
        #expect(outOfOrder?.problem == "tensor 'a': rows must be written in order; expected row 2 next, got 3")
        let wrongCount = #expect(throws: SafeTensorsError.self) {
            try values.withUnsafeBufferPointer { try writer.write("a", rows: 2..<3, values: $0) }
        }
        #expect(wrongCount?.problem == "tensor 'a': rows 2..<3 need 2 values, got 4")
        let incomplete = #expect(throws: SafeTensorsError.self) { try writer.finish() }
        #expect(incomplete?.problem == "tensor 'a' is incomplete: 2 of 4 rows written")
        #expect(!scratch.exists("stream.safetensors"), "nothing appears under the final name before finish")
        #expect(scratch.exists("stream.safetensors.tmp"))

        try values.withUnsafeBufferPointer { try writer.write("a", rows: 2..<4, values: $0) }
        try writer.finish()
        #expect(scratch.exists("stream.safetensors"))
        #expect(!scratch.exists("stream.safetensors.tmp"))
        #expect(try SafeTensorsFile(path: path).readAll("a") == values + values)
    }

    @Test func abandonedWriterLeavesNoFiles() throws {
        let scratch = ScratchDirectory()
        do {
            let writer = try SafeTensorsWriter(path: scratch.file("x.safetensors"), tensors: [.init(name: "a", dtype: .f32, shape: [1])])
            _ = writer
        }
        #expect(!scratch.exists("x.safetensors"))
        #expect(!scratch.exists("x.safetensors.tmp"))
    }

    @Test func writerRejectsBadDeclarations() {
        let scratch = ScratchDirectory()
        let path = scratch.file("w.safetensors")
        func problem(_ specs: [SafeTensorsWriter.TensorSpec]) -> String? {
            (#expect(throws: SafeTensorsError.self) { try SafeTensorsWriter(path: path, tensors: specs) })?.problem
        }
        #expect(problem([.init(name: "a", dtype: .f64, shape: [1])]) == "tensor 'a': dtype F64 cannot be written from Float (use F32, BF16 or F16)")
        #expect(problem([.init(name: "a", dtype: .f32, shape: [1]), .init(name: "a", dtype: .f32, shape: [2])]) == "tensor 'a' is declared twice")
        #expect(problem([.init(name: "a", dtype: .f32, shape: [-1])]) == "tensor 'a' has a negative dimension in shape [-1]")
        #expect(problem([.init(name: "__metadata__", dtype: .f32, shape: [1])]) == "'__metadata__' is reserved for metadata and cannot name a tensor")
        #expect(problem([.init(name: "a", dtype: .f32, shape: [1 << 40, 1 << 40])]) == "tensor 'a' with shape [1099511627776, 1099511627776] is too large")
    }
}
