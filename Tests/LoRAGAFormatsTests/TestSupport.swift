import Foundation

/// A fresh directory under the system temp dir, removed when the value is released.
final class ScratchDirectory {
    let path: String

    init() {
        path = NSTemporaryDirectory() + "/lora-ga-formats-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: path)
    }

    func file(_ name: String) -> String { path + "/" + name }

    func exists(_ name: String) -> Bool { FileManager.default.fileExists(atPath: file(name)) }
}

/// SplitMix64: a tiny deterministic generator so tests do not depend on the system RNG.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Standard normal samples (Box–Muller), the shape of real gradient entries.
    mutating func gaussians(_ count: Int, scale: Float = 1) -> [Float] {
        (0..<count).map { _ in
            let u1 = Double.random(in: Double.ulpOfOne..<1, using: &self)
            let u2 = Double.random(in: 0..<1, using: &self)
            return Float((-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)) * scale
        }
    }
}

/// Bytes of a safetensors file assembled by hand, for formats and corruptions
/// the writer would never produce.
func handMadeSafeTensors(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
    let json = Array(header.utf8)
    let length = declaredLength ?? UInt64(json.count)
    return withUnsafeBytes(of: length.littleEndian, Array.init) + json + data
}

func writeBytes(_ bytes: [UInt8], to path: String) {
    _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
}

func readBytes(_ path: String) -> [UInt8] {
    Array(FileManager.default.contents(atPath: path)!)
}

/// Little-endian bytes of fixed-width integers.
func littleEndianBytes<T: FixedWidthInteger>(_ values: [T]) -> [UInt8] {
    values.flatMap { withUnsafeBytes(of: $0.littleEndian, Array.init) }
}

/// Bit patterns, so NaN payloads and signed zeros compare exactly.
func bits(_ values: [Float]) -> [UInt32] { values.map(\.bitPattern) }

/// The shared fixture of real gradients, found relative to this source file.
func fixturePath(_ relative: String, file: String = #filePath) -> String {
    URL(fileURLWithPath: file)
        .deletingLastPathComponent()
        .deletingLastPathComponent()
        .appendingPathComponent("LoRAGASystemTests/Fixtures/minilm-sample")
        .appendingPathComponent(relative)
        .path
}
