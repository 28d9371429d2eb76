import LoRAGACore
import NIOCore
import Testing
@testable import LoRAGAWire

/// The bytes that name a dtype or a mode on the wire are fixed by the protocol: these pin them,
/// so a change to `TensorDType` or `SVDMode` cannot move a code without failing here.
@Suite struct VocabularyCodeTests {
    @Test("each dtype and mode keeps its wire code")
    func codesArePinned() {
        #expect(TensorDType.allCases.map(\.wireCode) == [0, 1, 2, 3])
        #expect(TensorDType.allCases.map(\.safetensorsName) == ["F32", "BF16", "F16", "F64"])
        #expect(TensorDType.allCases.map(\.byteSize) == [4, 2, 2, 8])
        #expect(TensorDType.allCases.filter(\.isPayloadType) == [.f32, .bf16, .f16])
        #expect(SVDMode.allCases.map(\.wireCode) == [0, 1, 2])
        #expect(SVDMode.allCases.map(\.rawValue) == ["dense", "sketch", "power"])
        for dtype in TensorDType.allCases { #expect(TensorDType(wireCode: dtype.wireCode) == dtype) }
        for mode in SVDMode.allCases { #expect(SVDMode(wireCode: mode.wireCode) == mode) }
        for code in UInt8(4)...UInt8.max { #expect(TensorDType(wireCode: code) == nil) }
        for code in UInt8(3)...UInt8.max { #expect(SVDMode(wireCode: code) == nil) }
    }

    func jobSpec(_ mode: SVDMode, _ dtype: TensorDType) -> JobSpec {
        JobSpec(jobID: "j", mode: mode, rank: 8, sketchWidth: 24, seed: 1, powerIterations: 5,
                rowsPerShard: 0, payloadDType: dtype, compression: .uncompressed)
    }

    // JobSpec with jobID "j": version u16, jobID (u16 length + 1 byte), then mode; payloadDType
    // follows rank u32, sketchWidth u32, seed u64, powerIterations u32, rowsPerShard u32.
    static let modeOffset = 2 + 2 + 1
    static let payloadDTypeOffset = modeOffset + 1 + 4 + 4 + 8 + 4 + 4
    // Announce of one layer named "a": count u32, name (u16 length + 1 byte), rows u64, cols u64.
    static let sourceDTypeOffset = 4 + 2 + 1 + 8 + 8

    @Test("the encoded bytes are the codes", arguments: SVDMode.allCases, [TensorDType.f32, .bf16, .f16])
    func encodedBytes(mode: SVDMode, dtype: TensorDType) throws {
        let payload = Samples.payloadBytes(.jobSpec(jobSpec(mode, dtype)))
        #expect(payload[Self.modeOffset] == mode.wireCode)
        #expect(payload[Self.payloadDTypeOffset] == dtype.wireCode)
        #expect(try Samples.decodeAll(Samples.frame(.jobSpec(jobSpec(mode, dtype)))) == [.jobSpec(jobSpec(mode, dtype))])
    }

    @Test("a source dtype travels as its code", arguments: TensorDType.allCases)
    func sourceDType(dtype: TensorDType) throws {
        let announce = Announce(layers: [LayerInfo(name: "a", rows: 2, cols: 3, sourceDType: dtype)])
        #expect(Samples.payloadBytes(.announce(announce))[Self.sourceDTypeOffset] == dtype.wireCode)
        #expect(try Samples.decodeAll(Samples.frame(.announce(announce))) == [.announce(announce)])
    }

    @Test("an unknown code is a WireError naming the field")
    func unknownCodes() throws {
        func decoded(_ type: WireMessageType, _ payload: [UInt8]) -> WireError? {
            do {
                _ = try Samples.decodeAll(Samples.rawFrame(type: type.rawValue, payload: payload))
                return nil
            } catch { return error }
        }
        var spec = Samples.payloadBytes(.jobSpec(jobSpec(.power, .bf16)))
        spec[Self.modeOffset] = 3
        #expect(decoded(.jobSpec, spec) == .malformed(.jobSpec, "mode has unknown value 3"))
        spec[Self.modeOffset] = SVDMode.power.wireCode
        spec[Self.payloadDTypeOffset] = 200
        #expect(decoded(.jobSpec, spec) == .malformed(.jobSpec, "payloadDType has unknown value 200"))

        var announce = Samples.payloadBytes(.announce(Announce(layers: [LayerInfo(name: "a", rows: 2, cols: 3, sourceDType: .f64)])))
        announce[Self.sourceDTypeOffset] = 4
        #expect(decoded(.announce, announce) == .malformed(.announce, "sourceDType has unknown value 4"))
    }
}
