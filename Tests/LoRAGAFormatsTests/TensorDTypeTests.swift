import Foundation
import LoRAGACore
import LoRAGAFormats
import Testing

/// lora-ga's one dtype vocabulary: every spelling of each case, and what a file in any other
/// dtype gets.
struct TensorDTypeTests {
    @Test func everySpellingIsPinned() {
        #expect(TensorDType.allCases == [.f32, .bf16, .f16, .f64])
        #expect(TensorDType.allCases.map(\.safetensorsName) == ["F32", "BF16", "F16", "F64"])
        #expect(TensorDType.allCases.map(\.rawValue) == ["F32", "BF16", "F16", "F64"])
        #expect(TensorDType.allCases.map(\.wireCode) == [0, 1, 2, 3])
        #expect(TensorDType.allCases.map(\.byteSize) == [4, 2, 2, 8])
        #expect(TensorDType.allCases.map(\.argumentName) == ["f32", "bf16", "f16", "f64"])
        #expect(TensorDType.writableCases == [.f32, .bf16, .f16])
    }

    @Test func everySpellingParsesBack() {
        for dtype in TensorDType.allCases {
            #expect(TensorDType(rawValue: dtype.safetensorsName) == dtype)
            #expect(TensorDType(wireCode: dtype.wireCode) == dtype)
            #expect(TensorDType(dtype.argumentName) == dtype, "flags and settings files use lower case")
            #expect(TensorDType(dtype.description) == dtype)
        }
        #expect(TensorDType(rawValue: "bf16") == nil, "safetensors names are upper case")
        for name in ["I64", "f8_e4m3", "float32", ""] { #expect(TensorDType(name) == nil, "\(name)") }
        #expect(TensorDType(wireCode: 4) == nil)
    }

    @Test func aGradientLayerHasItsFilesDType() throws {
        let scratch = ScratchDirectory()
        for dtype in TensorDType.writableCases {
            let path = scratch.file("\(dtype.argumentName).safetensors")
            try SafeTensorsWriter.write(path: path, tensors: [(.init(name: "l.weight", dtype: dtype, shape: [2, 3]), [Float](repeating: 1, count: 6))])
            #expect(try GradientFileSet(paths: [path]).layers.map(\.dtype) == [dtype])
        }
    }

    @Test func aTensorOfADTypeLoRAGADoesNotReadIsLeftOutNotALayer() throws {
        // An I64 step counter saved beside the gradients: the file opens, the counter is no layer.
        let scratch = ScratchDirectory()
        let path = scratch.file("b.safetensors")
        let header = #"{"l.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"step":{"dtype":"I64","shape":[1],"data_offsets":[24,32]}}"#
        writeBytes(handMadeSafeTensors(header: header, data: [UInt8](repeating: 0, count: 32)), to: path)
        #expect(try GradientFileSet(paths: [path]).layers.map(\.name) == ["l.weight"])
        let bad = scratch.file("c.safetensors")
        writeBytes(handMadeSafeTensors(header: header.replacingOccurrences(of: "I64", with: "Q7"), data: [UInt8](repeating: 0, count: 32)), to: bad)
        let error = #expect(throws: SafeTensorsError.self) { try GradientFileSet(paths: [bad]) }
        #expect(error?.description == "\(bad): tensor 'step' has unknown dtype 'Q7'")
    }
}
