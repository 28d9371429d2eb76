import LoRAGADaemon
import LoRAGACore
import LoRAGAFormats
import LoRAGAWire
import NIOCore

/// Shard bytes into a layer's sum or sketch: the executor side of a shard. The decision
/// (which layer, attempt, rows; whether it counts toward a commit) is the state machine's
/// (`shardBegan`, `shardEnded`); this part stages bytes that straddle pieces, decodes them,
/// checks them for NaN/Inf, and folds them in slice by slice.
extension CoordinatorEngine {
    /// Slice of a shard added to a dense sum at a time: fits in L2 with room for the sum's rows.
    static let denseSliceBytes = 256 << 10

    /// A shard whose rows are arriving on a connection, piece by piece.
    struct IncomingShard {
        let layer: Int
        let worker: String
        let rowStart: Int
        let rows: Int
        /// The shard's column window: a worker holding a block sends only its columns.
        let colStart: Int
        let cols: Int
        let dtype: TensorDType
        /// Rows added at a time: ~256 KB for a dense sum, the whole shard for a sketch.
        let sliceRows: Int
        /// Rows of the shard already added, and bytes of the next slice staged so far.
        var rowsDone = 0
        var staged = 0
        var sliceBytes: Int { Swift.min(sliceRows, rows - rowsDone) * cols * dtype.byteSize }
    }

    /// A shard that came whole (compressed, or from a decoder that assembles frames): its
    /// uncompressed rows as one piece.
    func receiveShard(_ shard: Shard, from connection: JobStateMachine.ConnectionID) {
        var fields = shard
        fields.payload = ByteBuffer()
        guard shard.compression == .zstdShuffled else {
            return receivePiece(ShardPiece(shard: fields, offset: 0, bytes: shard.payload, checksumMatches: shard.payloadMatchesChecksum), from: connection)
        }
        // Shape and dtype are checked against the job before decompression allocates.
        guard let started = startShard(fields, from: connection) else { return }
        incoming[connection] = .some(started)
        let bytes: ByteBuffer
        do {
            let dtypeBytes = shard.dtype.byteSize
            let shuffled = try shard.payload.withUnsafeReadableBytes { try codec.decompress($0, expectedSize: Int(shard.uncompressedBytes)) }
            bytes = ByteBuffer(bytes: shuffled.withUnsafeBytes { ByteShuffle.unshuffle($0, elementSize: dtypeBytes) })
        } catch {
            return refuse(connection, ErrorMessage(code: .badData, message: "layer \(shard.layerIndex): \(error)"))
        }
        addRows(bytes, checksumMatches: shard.payloadMatchesChecksum, from: connection, wireBytes: shard.payload.readableBytes)
    }

    /// Rows of a shard as they arrive. The first piece is checked against the job (layer,
    /// attempt, shape, row order, dtype); each slice of rows is decoded, checked for NaN/Inf
    /// and added once all of its bytes are in; the last piece brings the checksum's verdict
    /// and records the worker's progress, which its commit must match.
    func receivePiece(_ piece: ShardPiece, from connection: JobStateMachine.ConnectionID) {
        if piece.isFirst {
            incoming[connection] = .some(startShard(piece.shard, from: connection))
        }
        addRows(piece.bytes, checksumMatches: piece.isLast ? piece.checksumMatches ?? false : nil, from: connection, wireBytes: piece.bytes.readableBytes)
    }

    /// The next bytes of the shard being received on `connection` (`wireBytes` of them counted
    /// as received: compressed shards arrived smaller than their rows). `checksumMatches` is
    /// nil until the shard's last bytes, which come with the checksum's verdict.
    func addRows(_ received: ByteBuffer, checksumMatches: Bool?, from connection: JobStateMachine.ConnectionID, wireBytes: Int) {
        guard var shard = incoming[connection] ?? nil else { return }   // refused, or never begun
        var bytes = received
        while bytes.readableBytes > 0 {
            let need = shard.sliceBytes - shard.staged
            if shard.staged == 0 && bytes.readableBytes >= need {
                // The whole slice is in this piece: add it from the received bytes.
                let slice = bytes.readSlice(length: need)!
                guard slice.withUnsafeReadableBytes({ addSlice($0, of: &shard) }) else { return }
                continue
            }
            // Taken out of the dictionary while written, so it is not copied on write.
            var buffer = staging.removeValue(forKey: connection) ?? []
            if buffer.count < shard.sliceRows * shard.cols * shard.dtype.byteSize {
                buffer = [UInt8](repeating: 0, count: shard.sliceRows * shard.cols * shard.dtype.byteSize)
            }
            let count = Swift.min(need, bytes.readableBytes)
            buffer.withUnsafeMutableBytes { target in
                _ = bytes.readWithUnsafeReadableBytes { source in
                    target.baseAddress!.advanced(by: shard.staged).copyMemory(from: source.baseAddress!, byteCount: count)
                    return count
                }
            }
            shard.staged += count
            if count == need {
                let sliceBytes = shard.staged
                let added = buffer.withUnsafeBytes { addSlice(UnsafeRawBufferPointer(rebasing: $0[0..<sliceBytes]), of: &shard) }
                shard.staged = 0
                staging[connection] = buffer
                guard added else { return }
            } else {
                staging[connection] = buffer
            }
        }
        if let checksumMatches {
            assert(shard.rowsDone == shard.rows, "a shard's pieces add up to its rows (the decoder checks the frame length)")
            incoming[connection] = nil
            perform(machine.shardEnded(on: connection, checksumMatches: checksumMatches))
        } else {
            incoming[connection] = .some(shard)
        }
        work[shard.layer]?.bytes += wireBytes
        options.metrics.received(bytes: wireBytes)
        totalBytes += wireBytes
    }

    /// Checks a shard's fields against the job and readies its layer's sum; nil when refused.
    func startShard(_ shard: Shard, from connection: JobStateMachine.ConnectionID) -> IncomingShard? {
        let index = Int(shard.layerIndex)
        let worker: String
        let layer: GradientLayer
        switch machine.shardBegan(on: connection, shard) {
        case .accept(let who, let what):
            (worker, layer) = (who, what)
        case .ignore:
            return nil
        case .refuse(let error):
            refuse(connection, error)
            return nil
        }
        let dtype = shard.dtype
        if work[index]?.firstShard == nil {
            work[index]?.firstShard = .now
            if receivingSince == nil { receivingSince = .now }
        }
        if work[index]?.accumulator == nil {
            // Taken at the first shard, not when the layer opens: memory only once data comes,
            // and the time to map a large sum counts as receiving time.
            do {
                let size = layer.rows * layer.cols
                let reusable = spareSums.firstIndex { $0.count == size }
                if reusable == nil { spareSums.removeAll() }
                work[index, default: LayerWork(started: .now)].accumulator = try LayerAccumulator(
                    name: layer.name, rows: layer.rows, cols: layer.cols, settings: options.settings, reusing: reusable.map { spareSums.remove(at: $0) })
            } catch {
                perform(machine.fail(JobError(ExitStatus.kind(of: error), "\(error)")))
                return nil
            }
        }
        let rows = Int(shard.rowCount)
        // A dense sum takes a shard in slices of ~256 KB: decoded, checked and added
        // while the slice is in cache. A sketch multiplies whole shards (its GEMM wants them).
        let cols = Int(shard.cols)
        let sliceRows = work[index]!.accumulator!.isDense ? Swift.max(1, Swift.min(rows, Self.denseSliceBytes / (4 * cols))) : rows
        return IncomingShard(layer: index, worker: worker, rowStart: Int(shard.rowStart), rows: rows, colStart: Int(shard.colStart), cols: cols,
                             dtype: dtype, sliceRows: sliceRows)
    }

    /// Decodes, checks and adds the next slice of rows; false when it held a NaN or
    /// Inf, which fails the job (so slices added before it do not matter).
    func addSlice(_ raw: UnsafeRawBufferPointer, of shard: inout IncomingShard) -> Bool {
        let rows = raw.count / (shard.cols * shard.dtype.byteSize)
        let firstRow = shard.rowStart + shard.rowsDone
        let dense = work[shard.layer]!.accumulator!.isDense
        let region = LayerRegion(rows: firstRow..<(firstRow + rows), cols: shard.colStart..<(shard.colStart + shard.cols))
        let bad = withFloats(raw, as: shard.dtype, unaligned: dense) { floats -> Int? in
            if dense {
                // Checked and summed in one pass (straight from the frame for F32), at the block's offset.
                return work[shard.layer]!.accumulator!.addDenseFloat32(region, bytes: floats)
            }
            let values = UnsafeBufferPointer(start: floats.assumingMemoryBound(to: Float.self).baseAddress, count: region.elementCount)
            let block = RowBlock(rowStart: firstRow, rowCount: rows, cols: shard.cols, values: values)
            if let offset = block.firstNonFiniteIndex() { return offset }
            work[shard.layer]!.accumulator!.add(LayerBlock(region: region, values: values))
            return nil
        }
        if let bad {
            let name = machine.layers?[shard.layer].name ?? "#\(shard.layer)"
            perform(machine.fail(JobError(.badInput, "worker '\(shard.worker)': layer '\(name)' has a NaN or Inf value in row \(firstRow + bad / shard.cols)")))
            return false
        }
        shard.rowsDone += rows
        return true
    }

    /// The slice's values as native Float bytes: decoded into `scratch`, or, for F32 when the
    /// body reads them `unaligned` (the dense sum does), the received bytes themselves (wire
    /// floats are little-endian).
    func withFloats<T>(_ raw: UnsafeRawBufferPointer, as dtype: TensorDType, unaligned: Bool, _ body: (UnsafeRawBufferPointer) -> T) -> T {
        #if _endian(little)
        if dtype == .f32 && unaligned { return body(raw) }
        #endif
        let count = raw.count / dtype.byteSize
        if scratch.count < count { scratch = [Float](repeating: 0, count: count) }
        return scratch.withUnsafeMutableBufferPointer { floats in
            let values = UnsafeMutableBufferPointer(rebasing: floats[0..<count])
            FloatCodec.decode(raw, as: dtype, into: values)
            return body(UnsafeRawBufferPointer(values))
        }
    }
}
