import LoRAGACore

/// Public face of the float conversions, for code that moves gradients in stored
/// dtypes outside safetensors files (the wire: shards travel in F32, BF16 or F16).
public enum FloatCodec {
    /// Stored little-endian `dtype` values → Float (exact for F32/BF16/F16), or added onto `destination`.
    public static func decode(_ source: UnsafeRawBufferPointer, as dtype: TensorDType, into destination: UnsafeMutableBufferPointer<Float>, accumulate: Bool = false) {
        let count = source.count / dtype.byteSize
        precondition(count <= destination.count, "cannot decode \(source.count) bytes of \(dtype) into \(destination.count) floats")
        guard count > 0 else { return }
        FloatConversion.decode(source.baseAddress!, as: dtype, count: count, into: destination.baseAddress!, accumulate: accumulate)
    }

    /// Floats → little-endian `dtype` bytes (BF16/F16 rounded to nearest even).
    public static func encode(_ source: UnsafeBufferPointer<Float>, as dtype: TensorDType, into destination: UnsafeMutableRawBufferPointer) {
        precondition(destination.count >= source.count * dtype.byteSize && dtype.isWritableFromFloat, "cannot encode \(source.count) floats as \(dtype) into \(destination.count) bytes")
        guard source.count > 0 else { return }
        FloatConversion.encode(source.baseAddress!, count: source.count, as: dtype, into: destination.baseAddress!)
    }
}
