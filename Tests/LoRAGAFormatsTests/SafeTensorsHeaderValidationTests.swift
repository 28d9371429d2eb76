import Testing
import LoRAGAFormats

/// Every way a header can lie is rejected at open time, with a message that
/// names the file and the exact problem.
struct SafeTensorsHeaderValidationTests {
    struct Malformed: Sendable, CustomTestStringConvertible {
        let label: String
        let bytes: [UInt8]
        let problem: String
        var testDescription: String { label }

        /// A header followed by `dataSize` zero bytes of data section.
        init(_ label: String, header: String, dataSize: Int = 48, problem: String) {
            self.label = label
            bytes = handMadeSafeTensors(header: header, data: [UInt8](repeating: 0, count: dataSize))
            self.problem = problem
        }

        init(_ label: String, bytes: [UInt8], problem: String) {
            self.label = label
            self.bytes = bytes
            self.problem = problem
        }
    }

    /// A tensor entry for `x.weight` with the given JSON fields.
    static func entry(_ fields: String) -> String { #"{"x.weight":{"# + fields + "}}" }

    static let cases: [Malformed] = [
        Malformed("too short", bytes: [1, 0, 0, 0, 0], problem: "file is 5 bytes, shorter than the 8-byte header length"),
        Malformed("a text file", bytes: Array("not a gradient, just text\n".utf8),
                  problem: #"not a safetensors file (it starts with "not a gr"; a safetensors file starts with an 8-byte header length and a JSON header)"#),
        Malformed("length beyond file", bytes: handMadeSafeTensors(header: "{}", declaredLength: 64),
                  problem: "header length 64 goes beyond the end of the file (10 bytes)"),
        Malformed("length over 100 MiB", bytes: handMadeSafeTensors(header: "{}", declaredLength: 200 << 20),
                  problem: "header length 209715200 exceeds the limit of 104857600 bytes (100 MiB)"),
        Malformed("not JSON", header: "{not json}", problem: "header is not valid JSON"),
        Malformed("not UTF-8", bytes: handMadeSafeTensors(header: "{}", declaredLength: 3) + [0xFF], problem: "header is not valid UTF-8"),
        Malformed("JSON array", header: "[1, 2]", problem: "header is JSON but not an object (found an array)"),
        Malformed("JSON number", header: "42", problem: "header is JSON but not an object (found a number)"),
        Malformed("entry not an object", header: #"{"x.weight":[1]}"#, problem: "tensor 'x.weight' is not a JSON object"),
        Malformed("missing dtype", header: entry(#""shape":[3,4],"data_offsets":[0,48]"#), problem: #"tensor 'x.weight' has no "dtype""#),
        Malformed("missing shape", header: entry(#""dtype":"F32","data_offsets":[0,48]"#), problem: #"tensor 'x.weight' has no "shape""#),
        Malformed("missing offsets", header: entry(#""dtype":"F32","shape":[3,4]"#), problem: #"tensor 'x.weight' has no "data_offsets""#),
        Malformed("unknown dtype", header: entry(#""dtype":"F12","shape":[3,4],"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has unknown dtype 'F12'"),
        Malformed("another dtype's size", header: entry(#""dtype":"I64","shape":[3,2],"data_offsets":[0,40]"#),
                  problem: "tensor 'x.weight' has shape [3, 2] (6 elements of I64 = 48 bytes) but data_offsets span 40 bytes"),
        Malformed("dtype not a string", header: entry(#""dtype":4,"shape":[3,4],"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has dtype 4, which is not a string"),
        Malformed("shape not an array", header: entry(#""dtype":"F32","shape":12,"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has shape 12, which is not an array"),
        Malformed("negative shape", header: entry(#""dtype":"F32","shape":[-3,4],"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has shape entry -3, which is not a non-negative integer"),
        Malformed("fractional shape", header: entry(#""dtype":"F32","shape":[3.5,4],"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has shape entry 3.5, which is not a non-negative integer"),
        Malformed("float-written shape", header: entry(#""dtype":"F32","shape":[3.0,4],"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has shape entry 3.0, which is not a non-negative integer"),
        Malformed("string shape", header: entry(#""dtype":"F32","shape":["3",4],"data_offsets":[0,48]"#),
                  problem: #"tensor 'x.weight' has shape entry "3", which is not a non-negative integer"#),
        Malformed("boolean shape", header: entry(#""dtype":"F32","shape":[true,48],"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has shape entry true, which is not a non-negative integer"),
        Malformed("one offset", header: entry(#""dtype":"F32","shape":[3,4],"data_offsets":[48]"#),
                  problem: "tensor 'x.weight' has data_offsets [48], which is not two non-negative integers"),
        Malformed("negative offset", header: entry(#""dtype":"F32","shape":[3,4],"data_offsets":[-8,40]"#),
                  problem: "tensor 'x.weight' has data_offsets [-8, 40], which is not two non-negative integers"),
        Malformed("begin after end", header: entry(#""dtype":"F32","shape":[0],"data_offsets":[8,4]"#),
                  problem: "tensor 'x.weight' has data_offsets [8, 4] with begin after end"),
        Malformed("size mismatch", header: entry(#""dtype":"F32","shape":[3,4],"data_offsets":[0,40]"#),
                  problem: "tensor 'x.weight' has shape [3, 4] (12 elements of F32 = 48 bytes) but data_offsets span 40 bytes"),
        Malformed("size overflow", header: entry(#""dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,48]"#),
                  problem: "tensor 'x.weight' has shape [4294967296, 4294967296] whose size in bytes overflows"),
        Malformed("span beyond file", header: entry(#""dtype":"F32","shape":[3,4],"data_offsets":[8,56]"#),
                  problem: "tensor 'x.weight' has data_offsets [8, 56] beyond the data section (48 bytes)"),
        Malformed("overlap",
                  header: #"{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[6],"data_offsets":[20,44]}}"#,
                  problem: "tensors 'a' [0, 24) and 'b' [20, 44) overlap"),
        Malformed("metadata not an object", header: #"{"__metadata__":[1]}"#, problem: "__metadata__ is not an object"),
        Malformed("metadata value not a string", header: #"{"__metadata__":{"epoch":3}}"#,
                  problem: "__metadata__ entry 'epoch' is not a string"),
    ]

    @Test(arguments: cases)
    func malformedFileIsRejected(_ malformed: Malformed) {
        let scratch = ScratchDirectory()
        let path = scratch.file("grads.safetensors")
        writeBytes(malformed.bytes, to: path)
        let error = #expect(throws: SafeTensorsError.self) { try SafeTensorsFile(path: path) }
        #expect(error?.problem == malformed.problem)
        #expect(error?.description == "\(path): \(malformed.problem)")
    }

    @Test func missingFileNamesThePath() {
        let path = ScratchDirectory().file("absent.safetensors")
        let error = #expect(throws: SafeTensorsError.self) { try SafeTensorsFile(path: path) }
        #expect(error?.description.hasPrefix("\(path): cannot open: open failed: No such file or directory") == true)
    }

    @Test func acceptedOddities() throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("ok.safetensors")
        // Space padding, an empty tensor sharing an offset, extra fields, and an F64 tensor.
        let header = #"{"e":{"dtype":"F32","shape":[0,4],"data_offsets":[4,4]},"i":{"dtype":"F64","shape":[1],"data_offsets":[8,16]},"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}}   "#
        writeBytes(handMadeSafeTensors(header: header, data: [UInt8](repeating: 0, count: 16)), to: path)
        let file = try SafeTensorsFile(path: path)
        #expect(file.tensors.map(\.name) == ["e", "i", "v"])
        #expect(file.metadata.isEmpty)
        #expect(file.dataSectionOffset == 8 + header.utf8.count)
        #expect(try file.readAll("e").isEmpty)
        #expect(try file.readAll("v") == [0, 0])

        let empty = scratch.file("empty.safetensors")
        writeBytes(handMadeSafeTensors(header: "{}"), to: empty)
        #expect(try SafeTensorsFile(path: empty).tensors.isEmpty)
    }
}
