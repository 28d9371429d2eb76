import Foundation
import NIOCore
import NIOEmbedded
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
@testable import LoRAGAWorker

/// A worker whose one gradient file stores a layer as F32 sends its rows from the file
/// (`sendfile`), after checking and hashing them where they are mapped; anything else —
/// several files to sum, another dtype, compression — is read into a buffer as before.
@Suite struct SendFromFileTests {
    static let shape = (rows: 40, cols: 24)

    static func values(offset: Float = 0) -> [Float] {
        (0..<(shape.rows * shape.cols)).map { Float($0) * 0.25 - 100 + offset }
    }

    static func write(_ values: [Float], dtype: TensorDType = .f32, in dir: String, name: String = "grads") throws -> String {
        let path = "\(dir)/\(name).safetensors"
        // A small tensor first, so the layer's rows start at an offset that is not 0.
        try SafeTensorsWriter.write(path: path, tensors: [
            (.init(name: "a.bias", dtype: .f32, shape: [3]), [1, 2, 3]),
            (.init(name: "x.weight", dtype: dtype, shape: [shape.rows, shape.cols]), values),
        ])
        return path
    }

    /// The bytes `region` covers, read from the file with `pread`.
    static func bytes(of region: FileRegion, in path: String) throws -> [UInt8] {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: UInt64(region.readerIndex))
        return [UInt8](try handle.read(upToCount: region.readableBytes) ?? Data())
    }

    /// A worker's reader over `paths`, and the layer the tests send.
    static func open(_ paths: [String]) throws -> (reader: GradientReader, layer: GradientLayer) {
        let reader = try GradientReader(paths: paths)
        return (reader, try #require(reader.files.layers.first { $0.name == "x.weight" }))
    }

    @Test("one F32 file: the shard is the file's bytes of exactly those rows, hashed")
    func oneF32FileIsSentFromTheFile() throws {
        let dir = try Fixtures.scratch()
        let values = Self.values()
        let path = try Self.write(values, in: dir)
        let (reader, layer) = try Self.open([path])
        let shard = try reader.encode(layer, rows: 7..<19, as: .f32, compress: false)
        let region = try #require(shard.file)
        #expect(shard.uncompressed.readableBytes == 0)
        let sent = try Self.bytes(of: region, in: path)
        let expected = values[(7 * Self.shape.cols)..<(19 * Self.shape.cols)].withUnsafeBytes { [UInt8]($0) }
        #expect(sent == expected)
        #expect(shard.checksum == ShardChecksum.hash(expected))
        #expect(reader.sendsRowsFromFile(of: layer, as: .f32, compress: false))
    }

    @Test("a shard larger than one mapping is hashed a mapping at a time and sent as one region")
    func largeShardsAreHashedInPieces() throws {
        // 1 MB rows: a 4 MB mapping holds 4 of them, so rows 1..<10 take three mappings.
        let (rows, cols) = (11, 1 << 18)
        let values = (0..<(rows * cols)).map { Float($0 % 1009) - 504 }
        let path = "\(try Fixtures.scratch())/big.safetensors"
        try SafeTensorsWriter.write(path: path, tensors: [
            (.init(name: "a.bias", dtype: .f32, shape: [3]), [1, 2, 3]),
            (.init(name: "x.weight", dtype: .f32, shape: [rows, cols]), values),
        ])
        let (reader, layer) = try Self.open([path])
        let shard = try reader.encode(layer, rows: 1..<10, as: .f32, compress: false)
        let region = try #require(shard.file)
        let expected = values[cols..<(10 * cols)].withUnsafeBytes { [UInt8]($0) }
        #expect(try Self.bytes(of: region, in: path) == expected)
        #expect(shard.checksum == ShardChecksum.hash(expected))
    }

    @Test("two files to sum, a BF16 file, or compression: read into a buffer")
    func otherLayoutsAreReadIntoABuffer() throws {
        let dir = try Fixtures.scratch()
        let first = try Self.write(Self.values(), in: dir, name: "a")
        let second = try Self.write(Self.values(offset: 1), in: dir, name: "b")
        let bf16 = try Self.write(Self.values(), dtype: .bf16, in: try Fixtures.scratch("bf16"))
        for (paths, compress) in [([first, second], false), ([bf16], false), ([first], true)] {
            let (reader, layer) = try Self.open(paths)
            let shard = try reader.encode(layer, rows: 0..<10, as: .f32, compress: compress)
            #expect(shard.file == nil, "\(paths) compress \(compress)")
            #expect(shard.uncompressed.readableBytes == 10 * Self.shape.cols * 4)
            #expect(!reader.sendsRowsFromFile(of: layer, as: .f32, compress: compress), "\(paths) compress \(compress)")
        }
        let (reader, layer) = try Self.open([first])
        #expect(!reader.sendsRowsFromFile(of: layer, as: .bf16, compress: false))
    }

    @Test("rows at an offset that is not Float-aligned: read into a buffer")
    func misalignedRowsAreReadIntoABuffer() throws {
        let path = "\(try Fixtures.scratch())/odd.safetensors"
        try SafeTensorsWriter.write(path: path, tensors: [
            (.init(name: "a.bias", dtype: .bf16, shape: [1]), [1]),   // 2 bytes: the next tensor starts off by 2
            (.init(name: "x.weight", dtype: .f32, shape: [Self.shape.rows, Self.shape.cols]), Self.values()),
        ])
        let (reader, layer) = try Self.open([path])
        try #require(try SafeTensorsFile(path: path).storedOffset(of: "x.weight") % 4 != 0)
        #expect(!reader.sendsRowsFromFile(of: layer, as: .f32, compress: false))
        let shard = try reader.encode(layer, rows: 3..<9, as: .f32, compress: false)
        #expect(shard.file == nil)
        #expect(shard.uncompressed.readableBytes == 6 * Self.shape.cols * 4)
        #expect(shard.checksum == Self.values()[(3 * Self.shape.cols)..<(9 * Self.shape.cols)].withUnsafeBytes { ShardChecksum.hash($0) })
    }

    @Test("a NaN in the mapped rows is an error naming the file, layer and row")
    func nanIsFound() throws {
        let dir = try Fixtures.scratch()
        var values = Self.values()
        values[23 * Self.shape.cols + 11] = .nan
        let path = try Self.write(values, in: dir)
        let (reader, layer) = try Self.open([path])
        #expect(throws: GradientError.nonFinite(layer: "x.weight", source: path, row: 23)) {
            try reader.encode(layer, rows: 20..<30, as: .f32, compress: false)
        }
        #expect(try reader.encode(layer, rows: 0..<20, as: .f32, compress: false).file != nil)
    }

    @Test("FrameWriter sends a file-backed shard as its head and then the file region")
    func frameWriterSendsTheRegion() throws {
        let dir = try Fixtures.scratch()
        let values = Self.values()
        let path = try Self.write(values, in: dir)
        let (reader, layer) = try Self.open([path])
        let encoded = try reader.encode(layer, rows: 0..<Self.shape.rows, as: .f32, compress: false)
        let region = try #require(encoded.file)
        let fromFile = Shard(layerIndex: 2, rowStart: 0, rowCount: UInt32(Self.shape.rows), cols: UInt64(Self.shape.cols), dtype: .f32,
                             payloadFile: region, checksum: encoded.checksum, attempt: 1)
        let inMemory = Shard(layerIndex: 2, rowStart: 0, rowCount: UInt32(Self.shape.rows), cols: UInt64(Self.shape.cols), dtype: .f32,
                             payload: ByteBuffer(bytes: values.withUnsafeBytes { [UInt8]($0) }), checksum: nil, attempt: 1)
        #expect(inMemory.checksum == fromFile.checksum)

        let channel = EmbeddedChannel(handler: FrameWriter())
        try channel.writeOutbound(WireMessage.shard(fromFile))
        var head = try #require(try channel.readOutbound(as: IOData.self))
        guard case .byteBuffer(var frame) = head else { Issue.record("head is \(head)"); return }
        head = try #require(try channel.readOutbound(as: IOData.self))
        guard case .fileRegion(let sent) = head else { Issue.record("bulk is \(head)"); return }
        #expect(sent == region)
        frame.writeBytes(try Self.bytes(of: sent, in: path))
        var expected = ByteBuffer()
        try WireMessage.shard(inMemory).encodeFrame(into: &expected)
        #expect(frame == expected)
        #expect(try channel.readOutbound(as: IOData.self) == nil)
        _ = try? channel.finish()
    }

    @Test("a shard cannot carry rows both in memory and in a file, nor compressed ones in a file")
    func validation() throws {
        let dir = try Fixtures.scratch()
        let path = try Self.write(Self.values(), in: dir)
        let (reader, layer) = try Self.open([path])
        let region = try #require(try reader.encode(layer, rows: 0..<2, as: .f32, compress: false).file)
        var shard = Shard(layerIndex: 0, rowStart: 0, rowCount: 2, cols: UInt64(Self.shape.cols), dtype: .f32, payloadFile: region, checksum: 1)
        #expect(throws: Never.self) { try shard.validate() }
        shard.payload = ByteBuffer(bytes: [1, 2, 3, 4])
        #expect(throws: WireError.self) { try shard.validate() }
        shard.payload = ByteBuffer()
        shard.compression = .zstdShuffled
        #expect(throws: WireError.self) { try shard.validate() }
    }

    @Test("the sendfile probe: yes for a regular file, no for a descriptor sendfile cannot read")
    func sendfileProbe() throws {
        let dir = try Fixtures.scratch()
        let path = try Self.write(Self.values(), in: dir)
        let file = try SafeTensorsFile(path: path)
        let descriptor = try file.duplicateDescriptor()
        defer { close(descriptor) }
        #expect(GradientReader.canSendfile(from: descriptor))
        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        defer {
            close(ends[0])
            close(ends[1])
        }
        #expect(!GradientReader.canSendfile(from: ends[0]))
    }
}
