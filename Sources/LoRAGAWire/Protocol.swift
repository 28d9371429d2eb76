/// # lora-ga wire protocol, version 3
///
/// A coordinator (TCP server) and workers (clients) exchange length-prefixed
/// binary frames. The codec below knows message layouts and structural limits
/// only; what a message means for a job (does this layer exist, is this worker
/// allowed, does the shard fit the layer) is the coordinator's and worker's
/// business.
///
/// ## Frame
///
/// ```text
/// +----------------+---------+------------------------------+
/// | length: u32 LE | type: u8| payload: length − 1 bytes    |
/// +----------------+---------+------------------------------+
/// ```
///
/// - `length` counts the type byte plus the payload, so it is at least 1.
///   A length of 0 is an error (``WireError/emptyFrame``).
/// - A receiver rejects `length > maxFrameLength` (default 64 MiB + 64 KiB:
///   a 64 MiB shard plus headroom for its header) as soon as the four length
///   bytes have arrived, before it buffers or allocates anything for the
///   payload (``WireError/frameTooLarge(length:max:)``). An unknown `type`
///   is rejected as soon as the fifth byte has arrived
///   (``WireError/unknownMessageType(_:)``).
/// - The payload must parse exactly: a missing field, a trailing byte, a
///   string that is not UTF-8, an enum value out of range or a byte count that
///   disagrees with the declared shape is ``WireError/malformed(_:_:)``.
///
/// ## Field encodings
///
/// - Integers: little-endian, fixed width (`u8`, `u16`, `u32`, `u64`).
/// - `string`: `u16` byte count, then that many bytes of UTF-8 (no NUL
///   terminator). Limits: layer names 1…1024 bytes, worker and job ids
///   1…256 bytes, paths and free text 0…4096 bytes.
/// - `bytes32`: exactly 32 raw bytes.
/// - `[T]`: `u32` element count, then the elements.
/// - `dtype` (u8): 0 F32, 1 BF16, 2 F16, 3 F64 (F64 only as a source dtype in
///   `Announce`; payloads travel as F32, BF16 or F16).
/// - `compression` (u8): 0 none, 1 zstd over byte-shuffled elements.
/// - Matrices in payloads are row-major (C order), like safetensors and
///   PyTorch; gradient rows are the weight's `out` dimension.
///
/// ## Messages
///
/// | type | name | direction | payload |
/// |---:|---|---|---|
/// | 1 | `Hello` | worker → coord | protocolVersion u16 (=2), workerID string, sessionNonce u64, authProof bytes32 |
/// | 2 | `Challenge` | coord → worker | nonce bytes32 |
/// | 3 | `JobSpec` | coord → worker | protocolVersion u16, jobID string, mode u8 (0 dense, 1 sketch, 2 power), rank u32, sketchWidth u32, seed u64, powerIterations u32, rowsPerShard u32, payloadDType u8 (F32/BF16/F16), compression u8, skipLayers [string] |
/// | 4 | `Announce` | worker → coord | layers [LayerInfo{name string, rows u64, cols u64, sourceDType u8}] |
/// | 5 | `LayerBegin` | coord → worker | layerIndex u32, attempt u32, name string |
/// | 6 | `Shard` | worker → coord | layerIndex u32, attempt u32, rowStart u64, rowCount u32, cols u64, dtype u8, compression u8, uncompressedBytes u64, checksum u64, payload (rest of frame) |
/// | 7 | `LayerCommit` | worker → coord | layerIndex u32, attempt u32, shardCount u32, rowCount u64, checksum u64 |
/// | 8 | `LayerDone` | coord → worker | layerIndex u32 |
/// | 9 | `PowerRequest` | coord → worker | layerIndex u32, round u32, side u8 (0 range, 1 corange), matrixRows u32, matrixCols u32, payload F32 LE |
/// | 10 | `PowerReply` | worker → coord | same fields as `PowerRequest` |
/// | 11 | `ErrorMessage` | either | code u16, message string |
/// | 12 | `JobDone` | coord → worker | adapterPath string, layers u32 |
/// | 13 | `Goodbye` | either | reason string |
///
/// Details:
///
/// - `Hello.protocolVersion` is the first payload field of the first frame in
///   every version, so even a Hello this version cannot parse shows its
///   version (payload bytes 0–1) and can be answered with
///   `ErrorMessage(badVersion)`; the codec itself accepts any value. `sessionNonce` is random per
///   worker process: a reconnect shows the same workerID with the same nonce,
///   a restarted worker a new one. `authProof` is all zero when the job has no
///   secret.
/// - `Challenge.nonce` is 32 random bytes; it is sent but the HMAC answer is
///   reserved for a later revision (planned: HMAC-SHA256(secret, nonce ‖
///   workerID ‖ sessionNonce) carried in `Hello.authProof` of a re-sent Hello).
/// - `JobSpec.sketchWidth` is k = 2r + oversampling; `seed` drives the
///   counter-based test matrices; `skipLayers` names layers that a restarted
///   coordinator already has on disk.
/// - `Shard` carries rows `[rowStart, rowStart + rowCount)` of the layer's
///   gradient, `cols` wide, row-major in `dtype`. `uncompressedBytes` always
///   equals `rowCount × cols × size(dtype)`; without compression the payload
///   is exactly that many bytes. With compression the receiver must check
///   `rowCount`/`cols` against the job before allocating `uncompressedBytes`.
/// - `Shard.checksum` is XXH3-64 (seed 0, default secret, see ``ShardChecksum``) of the
///   payload as sent (compressed bytes when compressed). The coordinator hashes
///   each piece as it reads it; a shard that does not match is refused like a
///   bad commit (the worker reconnects and resends the layer).
/// - `LayerCommit.checksum` is XXH3-64 over the checksums of the
///   layer's shards (u64 LE each), in send order. A layer counts only once the
///   commit arrives and rows, shard count and this checksum match.
/// - Version 1 hashed all of a layer's uncompressed payload bytes into the
///   commit instead of each shard: both ends then hashed after the bytes had
///   left the cache (a third of the per-byte CPU of a dense job). Version 2
///   used xxHash64 where version 3 uses XXH3-64 (twice as fast here, see
///   ``ShardChecksum``); the messages are unchanged. Each version refuses peers
///   of the others with `badVersion`.
/// - `PowerRequest` side 0 (range): X is cols × k, reply with G·X (rows × k);
///   side 1 (corange): X is rows × k, reply with Gᵀ·X (cols × k).
///   `matrixRows`/`matrixCols` describe the payload matrix of *this* frame;
///   its byte count must be `matrixRows × matrixCols × 4`.
/// - `ErrorMessage.code`: 1 badVersion, 2 badAuth, 3 duplicateWorker,
///   4 shapeMismatch, 5 layerMismatch, 6 badData, 7 internal, 8 jobFailed
///   (0 is reserved).
///
/// ## Conversation
///
/// ```text
/// worker                                  coordinator
///   Hello(version, workerID, nonce, proof) ──▶
///                                        ◀── Challenge(nonce)
///   (authentication: reserved)
///                                        ◀── JobSpec(mode, rank, k, seed, …, skipLayers)
///   Announce([LayerInfo]) ──▶                (coordinator checks shapes against the job)
///
///   dense / sketch mode, per layer (at most a few layers open at once):
///                                        ◀── LayerBegin(i, name)
///   Shard(i, rows a…b) … Shard(i, …) ──▶
///   LayerCommit(i, shards, rows, checksum) ──▶
///                                        ◀── LayerDone(i)   (after the layer is durable)
///
///   power mode, per layer:
///                                        ◀── LayerBegin(i, name)
///                                        ◀── PowerRequest(i, round, side, X)
///   PowerReply(i, round, side, G·X or Gᵀ·X) ──▶
///   … q + 1 rounds …
///                                        ◀── LayerDone(i)
///
///                                        ◀── JobDone(adapterPath, layers)
///   Goodbye(reason) ◀──▶ Goodbye(reason)
/// ```
///
/// Either side may send `ErrorMessage` at any point and then close; either
/// side may send `Goodbye` before a deliberate close. A worker that loses its
/// connection reconnects with a new `Hello` (same sessionNonce); the
/// coordinator discards its uncommitted shards and sends `LayerBegin` again.
public enum WireProtocol {
    /// The protocol version this module speaks.
    public static let version: UInt16 = 3

    /// Default bound on a frame's `length` field: a 64 MiB shard plus 64 KiB of headers.
    public static let defaultMaxFrameLength = (64 << 20) + (64 << 10)

    /// Size of the `length` prefix.
    public static let lengthFieldBytes = 4

    /// Largest layer name in bytes of UTF-8.
    public static let maxLayerNameBytes = 1024
    /// Largest worker or job id in bytes of UTF-8.
    public static let maxIDBytes = 256
    /// Largest path or free-text field (error message, goodbye reason) in bytes of UTF-8.
    public static let maxTextBytes = 4096
}

/// The type byte of a frame.
public enum WireMessageType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case hello = 1
    case challenge = 2
    case jobSpec = 3
    case announce = 4
    case layerBegin = 5
    case shard = 6
    case layerCommit = 7
    case layerDone = 8
    case powerRequest = 9
    case powerReply = 10
    case error = 11
    case jobDone = 12
    case goodbye = 13

    public var description: String {
        switch self {
        case .hello: "Hello"
        case .challenge: "Challenge"
        case .jobSpec: "JobSpec"
        case .announce: "Announce"
        case .layerBegin: "LayerBegin"
        case .shard: "Shard"
        case .layerCommit: "LayerCommit"
        case .layerDone: "LayerDone"
        case .powerRequest: "PowerRequest"
        case .powerReply: "PowerReply"
        case .error: "ErrorMessage"
        case .jobDone: "JobDone"
        case .goodbye: "Goodbye"
        }
    }
}
