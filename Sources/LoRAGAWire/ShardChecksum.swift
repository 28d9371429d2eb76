import LoRAGACore
import NIOCore

/// Incremental xxHash64 (Yann Collet's XXH64, seed 0 on the wire).
///
/// On the wire: `Shard.checksum` is the hash of the shard's payload as sent, and
/// `LayerCommit.checksum` the hash of the layer's shard checksums (8 bytes little-endian
/// each, in send order, see ``addShard(_:)``). Both ends feed the same bytes, in any
/// chunking. xxHash64 runs four independent lanes of 8 bytes, so it keeps up with a
/// network link where byte-at-a-time FNV-1a (one dependent multiply per byte) would not.
public struct ShardChecksum: Sendable, Hashable {
    public static let algorithm = "xxHash64"

    private static let prime1: UInt64 = 0x9E37_79B1_85EB_CA87
    private static let prime2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    private static let prime3: UInt64 = 0x1656_67B1_9E37_79F9
    private static let prime4: UInt64 = 0x85EB_CA77_C2B2_AE63
    private static let prime5: UInt64 = 0x27D4_EB2F_1656_67C5
    private static let stripeBytes = 32

    public let seed: UInt64
    private var lanes: (UInt64, UInt64, UInt64, UInt64)
    /// Bytes of an incomplete stripe, carried to the next update.
    private var pending: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
    private var pendingCount = 0
    /// Total bytes fed so far.
    public private(set) var byteCount: UInt64 = 0

    public init(seed: UInt64 = 0) {
        self.seed = seed
        self.lanes = (
            seed &+ Self.prime1 &+ Self.prime2,
            seed &+ Self.prime2,
            seed,
            seed &- Self.prime1
        )
    }

    public static func == (lhs: ShardChecksum, rhs: ShardChecksum) -> Bool {
        lhs.seed == rhs.seed && lhs.byteCount == rhs.byteCount && lhs.value == rhs.value
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(seed)
        hasher.combine(byteCount)
        hasher.combine(value)
    }

    /// One-shot hash of `bytes`.
    public static func hash(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        var checksum = ShardChecksum(seed: seed)
        checksum.update(bytes)
        return checksum.value
    }

    /// One-shot hash of `bytes`.
    public static func hash(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { hash($0, seed: seed) }
    }

    /// Feeds one shard's checksum (8 bytes, little-endian): a layer's commit checksum is the
    /// hash of its shards' checksums in send order.
    public mutating func addShard(_ shardChecksum: UInt64) {
        withUnsafeBytes(of: shardChecksum.littleEndian) { update($0) }
    }

    /// The commit checksum of a layer sent as shards with these checksums, in this order.
    public static func layer(shardChecksums: [UInt64]) -> UInt64 {
        var checksum = ShardChecksum()
        for shard in shardChecksums { checksum.addShard(shard) }
        return checksum.value
    }

    /// Feeds the readable bytes of `buffer` (the reader index is not moved).
    public mutating func update(_ buffer: ByteBuffer) {
        buffer.withUnsafeReadableBytes { update($0) }
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        _ = feed(bytes, checkingFloats: false)
    }

    /// Feeds `bytes`, a whole number of little-endian Float32 values (and so far a whole
    /// number of them was fed), and tells whether every one of them is finite. The check rides
    /// on the hash's own 8-byte loads — an exponent test on both halves of each word, on ALU
    /// ports the hash's multiplies leave idle — so a sender that must both check and hash rows
    /// it has not read yet touches them once instead of twice.
    public mutating func updateCheckingFinite(float32 bytes: UnsafeRawBufferPointer) -> Bool {
        precondition(bytes.count % 4 == 0 && byteCount % 4 == 0, "updateCheckingFinite(float32:) needs whole Float32 values (\(bytes.count) bytes after \(byteCount))")
        return feed(bytes, checkingFloats: true)
    }

    /// The hash's update; with `checkingFloats`, also whether no Float32 in `bytes` is NaN or
    /// infinite (meaningful only at 4-byte alignment relative to the values, see above).
    @inline(__always)
    private mutating func feed(_ bytes: UnsafeRawBufferPointer, checkingFloats: Bool) -> Bool {
        guard !bytes.isEmpty, let base = bytes.baseAddress else { return true }
        byteCount &+= UInt64(bytes.count)
        var offset = 0
        var flags: UInt64 = 0

        if pendingCount > 0 {
            let take = min(Self.stripeBytes - pendingCount, bytes.count)
            if checkingFloats {
                for at in stride(from: 0, to: take, by: 4) { flags |= Self.nonFiniteFlags(UInt64(Self.load32(base, at))) }
            }
            withUnsafeMutableBytes(of: &pending) { stash in
                stash.baseAddress!.advanced(by: pendingCount).copyMemory(from: base, byteCount: take)
            }
            pendingCount += take
            offset = take
            guard pendingCount == Self.stripeBytes else { return flags == 0 }
            let stash = pending
            withUnsafeBytes(of: stash) { consumeStripe($0.baseAddress!) }
            pendingCount = 0
        }

        // Hot loop: whole stripes straight from the caller's memory.
        var (v1, v2, v3, v4) = lanes
        while bytes.count - offset >= Self.stripeBytes {
            let p = base.advanced(by: offset)
            // The sender's rows come straight from a mapped file, i.e. from memory (xxHash64 on a
            // mapped 180 MB file: 4.1–4.7 GB/s without, 8.4–8.5 with); the receiver hashes
            // bytes it has just copied, which are in cache.
            if checkingFloats { Prefetch.read(p + Prefetch.distance) }
            let (w1, w2, w3, w4) = (Self.load64(p, 0), Self.load64(p, 8), Self.load64(p, 16), Self.load64(p, 24))
            v1 = Self.round(v1, w1)
            v2 = Self.round(v2, w2)
            v3 = Self.round(v3, w3)
            v4 = Self.round(v4, w4)
            if checkingFloats {
                flags |= Self.nonFiniteFlags(w1) | Self.nonFiniteFlags(w2) | Self.nonFiniteFlags(w3) | Self.nonFiniteFlags(w4)
            }
            offset += Self.stripeBytes
        }
        lanes = (v1, v2, v3, v4)

        let rest = bytes.count - offset
        if rest > 0 {
            if checkingFloats {
                for at in stride(from: offset, to: bytes.count, by: 4) { flags |= Self.nonFiniteFlags(UInt64(Self.load32(base, at))) }
            }
            withUnsafeMutableBytes(of: &pending) { stash in
                stash.baseAddress!.copyMemory(from: base.advanced(by: offset), byteCount: rest)
            }
            pendingCount = rest
        }
        return flags == 0
    }

    /// The hash of everything fed so far; feeding may continue afterwards.
    public var value: UInt64 {
        var h: UInt64
        if byteCount >= UInt64(Self.stripeBytes) {
            let (v1, v2, v3, v4) = lanes
            h = Self.rotl(v1, 1) &+ Self.rotl(v2, 7) &+ Self.rotl(v3, 12) &+ Self.rotl(v4, 18)
            h = Self.mergeRound(h, v1)
            h = Self.mergeRound(h, v2)
            h = Self.mergeRound(h, v3)
            h = Self.mergeRound(h, v4)
        } else {
            h = seed &+ Self.prime5
        }
        h &+= byteCount

        let stash = pending
        let count = pendingCount
        withUnsafeBytes(of: stash) { raw in
            let p = raw.baseAddress!
            var offset = 0
            while count - offset >= 8 {
                h ^= Self.round(0, Self.load64(p, offset))
                h = Self.rotl(h, 27) &* Self.prime1 &+ Self.prime4
                offset += 8
            }
            if count - offset >= 4 {
                let word = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
                h ^= UInt64(word) &* Self.prime1
                h = Self.rotl(h, 23) &* Self.prime2 &+ Self.prime3
                offset += 4
            }
            while offset < count {
                h ^= UInt64(p.load(fromByteOffset: offset, as: UInt8.self)) &* Self.prime5
                h = Self.rotl(h, 11) &* Self.prime1
                offset += 1
            }
        }

        h ^= h >> 33
        h &*= Self.prime2
        h ^= h >> 29
        h &*= Self.prime3
        h ^= h >> 32
        return h
    }

    private mutating func consumeStripe(_ p: UnsafeRawPointer) {
        lanes.0 = Self.round(lanes.0, Self.load64(p, 0))
        lanes.1 = Self.round(lanes.1, Self.load64(p, 8))
        lanes.2 = Self.round(lanes.2, Self.load64(p, 16))
        lanes.3 = Self.round(lanes.3, Self.load64(p, 24))
    }

    @inline(__always)
    private static func load64(_ p: UnsafeRawPointer, _ offset: Int) -> UInt64 {
        UInt64(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    @inline(__always)
    private static func load32(_ p: UnsafeRawPointer, _ offset: Int) -> UInt32 {
        UInt32(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    /// Nonzero when either Float32 half of `word` has an all-ones exponent (NaN or ±Inf):
    /// such a half is zero after masking the exponent and flipping it, and a zero half shows
    /// up as its top bit in (t − 1) & ~t (a borrow out of a zero low half can only flag the
    /// high half when the low one is flagged already).
    @inline(__always)
    private static func nonFiniteFlags(_ word: UInt64) -> UInt64 {
        let exponents: UInt64 = 0x7F80_0000_7F80_0000
        let t = (word & exponents) ^ exponents
        return (t &- 0x0000_0001_0000_0001) & ~t & 0x8000_0000_8000_0000
    }

    @inline(__always)
    private static func rotl(_ x: UInt64, _ r: UInt64) -> UInt64 {
        (x << r) | (x >> (64 - r))
    }

    @inline(__always)
    private static func round(_ acc: UInt64, _ input: UInt64) -> UInt64 {
        rotl(acc &+ input &* prime2, 31) &* prime1
    }

    @inline(__always)
    private static func mergeRound(_ acc: UInt64, _ value: UInt64) -> UInt64 {
        (acc ^ round(0, value)) &* prime1 &+ prime4
    }
}
