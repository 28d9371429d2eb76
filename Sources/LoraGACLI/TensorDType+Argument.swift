import ArgumentParser
import LoRAGACore

// The dtype options that `export` and `synth` still declare with swift-argument-parser name
// data written from Float, so only the writable dtypes parse (F64 is read from files only).
extension TensorDType: ExpressibleByArgument {
    public init?(argument: String) {
        guard let dtype = TensorDType(argument), dtype.isWritableFromFloat else { return nil }
        self = dtype
    }
    public static var allValueStrings: [String] { writableCases.map(\.safetensorsName) }
}
