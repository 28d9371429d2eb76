import Testing
@testable import LoRAGAFormats

/// Exactness of the element conversions on every pattern or on the edge cases
/// (subnormals, infinities, NaN, rounding ties) where a shortcut would differ.
struct FloatConversionTests {
    @Test func widenHalfMatchesFloat16OnAllPatterns() {
        for pattern in UInt16.min...UInt16.max {
            let expected = Float(Float16(bitPattern: pattern))
            #expect(FloatConversion.widenHalf(pattern).bitPattern == expected.bitPattern, "F16 pattern \(pattern)")
        }
    }

    @Test func decodeAllBFloat16PatternsExactly() {
        let patterns = Array(UInt16.min...UInt16.max)
        var decoded = [Float](repeating: 0, count: patterns.count)
        patterns.withUnsafeBytes { raw in
            FloatConversion.decode(raw.baseAddress!, as: .bf16, count: patterns.count, into: &decoded, accumulate: false)
        }
        // BF16 is the top half of a float32, NaN payloads included.
        #expect(bits(decoded) == patterns.map { UInt32($0) << 16 })
    }

    @Test func decodeAccumulates() {
        let stored: [Float] = [1, -2, 0.5]
        var destination: [Float] = [10, 10, 10]
        stored.withUnsafeBytes { raw in
            FloatConversion.decode(raw.baseAddress!, as: .f32, count: 3, into: &destination, accumulate: true)
        }
        #expect(destination == [11, 8, 10.5])
    }

    @Test(arguments: [
        // (float32 bits, expected bf16 bits)
        (0x3F80_0000, 0x3F80),  // 1.0 exact
        (0x3F80_8000, 0x3F80),  // tie 1 + 2^-8: to even (down)
        (0x3F81_8000, 0x3F82),  // tie with odd lower neighbour: to even (up)
        (0x3F80_8001, 0x3F81),  // just above the tie: up
        (0x3F80_7FFF, 0x3F80),  // just below the tie: down
        (0x7F7F_7FFF, 0x7F7F),  // below the overflow tie: largest finite
        (0x7F7F_8000, 0x7F80),  // overflow tie rounds to even = +inf
        (0x7F7F_FFFF, 0x7F80),  // Float.greatestFiniteMagnitude: +inf
        (0x7F80_0000, 0x7F80),  // +inf
        (0xFF80_0000, 0xFF80),  // -inf
        (0x8000_0000, 0x8000),  // -0
        (0x0000_0001, 0x0000),  // smallest subnormal: below half an ulp
        (0x0000_8000, 0x0000),  // subnormal tie: to even (zero)
        (0x0001_8000, 0x0002),  // subnormal tie with odd neighbour: up
        (0x0000_8001, 0x0001),  // subnormal just above the tie
        (0x007F_FFFF, 0x0080),  // largest subnormal rounds up into the normals
        (0x7FC0_0000, 0x7FC0),  // quiet NaN
        (0x7F80_0001, 0x7FC0),  // NaN whose payload is only in the dropped bits stays NaN
        (0xFF80_0001, 0xFFC0),  // negative NaN keeps its sign
        (0x7FFF_FFFF, 0x7FFF),  // NaN must not round up into the sign bit
    ] as [(UInt32, UInt16)])
    func bfloat16RoundsToNearestEven(input: UInt32, expected: UInt16) {
        #expect(FloatConversion.roundToBFloat16(Float(bitPattern: input)) == expected)
    }

    @Test(arguments: [
        // (float32 value, expected f16 bits)
        (Float(1), 0x3C00),
        (Float(65504), 0x7BFF),                      // largest finite half
        (Float(65519.99), 0x7BFF),                   // below the overflow tie
        (Float(65520), 0x7C00),                      // overflow tie rounds to even = +inf
        (Float.infinity, 0x7C00),
        (-Float.infinity, 0xFC00),
        (Float(-0.0), 0x8000),
        (Float(0x1p-24), 0x0001),                    // smallest half subnormal
        (Float(0x1p-25), 0x0000),                    // tie to even: zero
        (Float(0x1.8p-24), 0x0002),                  // 1.5 ulp: tie to even (2)
        (Float(0x1p-14), 0x0400),                    // smallest half normal
        (Float(1 + 0x1p-11), 0x3C00),                // tie above 1.0: to even (down)
        (Float(1 + 0x3p-11), 0x3C02),                // tie above odd mantissa: up
    ] as [(Float, UInt16)])
    func halfRoundsToNearestEven(input: Float, expected: UInt16) {
        var encoded: UInt16 = 0
        withUnsafePointer(to: input) { FloatConversion.encode($0, count: 1, as: .f16, into: &encoded) }
        #expect(encoded == expected)
    }

    @Test func halfKeepsNaN() {
        var encoded: UInt16 = 0
        withUnsafePointer(to: Float.nan) { FloatConversion.encode($0, count: 1, as: .f16, into: &encoded) }
        #expect(Float16(bitPattern: encoded).isNaN)
    }
}
