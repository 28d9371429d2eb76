import LoRAGACore
import NIOCore

#if !_endian(little)
#error("ShardChecksum loads 64-bit lanes in host order; the wire's checksum is defined on little-endian words")
#endif

/// Incremental XXH3-64 (Yann Collet's XXH3, 64-bit, seed 0 and the default secret), the same
/// value as `XXH3_64bits` of libxxhash for the same bytes.
///
/// On the wire: `Shard.checksum` is the hash of the shard's payload as sent, and
/// `LayerCommit.checksum` the hash of the layer's shard checksums (8 bytes little-endian
/// each, in send order, see ``addShard(_:)``). Both ends feed the same bytes, in any
/// chunking.
///
/// Why XXH3 and not XXH64: every byte of a dense job is hashed twice, by the worker that
/// reads it and by the coordinator that receives it. XXH64 makes two dependent 64-bit
/// multiplies per 8 bytes; XXH3's 64-byte stripes are eight independent 32×32→64-bit
/// products, which a portable SSE2 build does two at a time (`pmuludq`), about twice as fast.
///
/// One more step than the reference: within a 1 KB block XXH3 only adds into its eight
/// accumulators (`acc[i] += lo32(d^k)·hi32(d^k)`, `acc[i^1] += d`), so the products and the
/// data are summed in two vectors and folded into the accumulators — with the `i^1` swap —
/// once per block or call, not once per stripe.
public struct ShardChecksum: Sendable, Hashable {
    public static let algorithm = "XXH3-64"

    private typealias Lanes = SIMD8<UInt64>

    static let stripeBytes = 64
    /// Stripes of one block; the accumulators are scrambled after each block.
    static let stripesPerBlock = (secretBytes - stripeBytes) / 8
    /// Inputs up to this size have their own short-input hashes (the whole input is kept).
    static let shortInputLimit = 240
    /// Bytes kept between updates: all of a short input, else the unhashed tail.
    static let bufferBytes = 256
    static let secretBytes = 192

    private static let prime32_1: UInt64 = 0x9E37_79B1
    private static let prime32_2: UInt64 = 0x85EB_CA77
    private static let prime32_3: UInt64 = 0xC2B2_AE3D
    private static let prime64_1: UInt64 = 0x9E37_79B1_85EB_CA87
    private static let prime64_2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    private static let prime64_3: UInt64 = 0x1656_67B1_9E37_79F9
    private static let prime64_4: UInt64 = 0x85EB_CA77_C2B2_AE63
    private static let prime64_5: UInt64 = 0x27D4_EB2F_1656_67C5
    private static let primeMX1: UInt64 = 0x1656_6791_9E37_79F9
    private static let primeMX2: UInt64 = 0x9FB2_1C65_1E98_DF25

    /// XXH3's default secret (`XXH3_kSecret`).
    private static let secret: [UInt8] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
        0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
        0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
        0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
        0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
        0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
        0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
        0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
        0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
        0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
        0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
        0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
    ]

    /// The key of each stripe of a block (stripe j: the secret's bytes 8j ..< 8j + 64), then the
    /// scramble key (bytes 128 ..< 192), then the last stripe's key (bytes 121 ..< 185).
    private static let keys: [Lanes] = {
        let offsets = (0..<stripesPerBlock).map { 8 * $0 } + [secretBytes - stripeBytes, secretBytes - stripeBytes - 7]
        return secret.withUnsafeBytes { raw in offsets.map { raw.loadUnaligned(fromByteOffset: $0, as: Lanes.self) } }
    }()
    private static var scrambleKeyIndex: Int { stripesPerBlock }
    private static var lastStripeKeyIndex: Int { stripesPerBlock + 1 }

    private var accumulators = Lanes(prime32_3, prime64_1, prime64_2, prime64_3, prime64_4, prime32_2, prime64_5, prime32_1)
    /// Stripes of the current block already in the accumulators.
    private var stripesInBlock = 0
    /// All of a short input, else the unhashed tail at the front (1 … 256 bytes) and, when
    /// that tail is under a stripe, the last 64 hashed bytes at the back: the last stripe of
    /// the input is always hashed with its own key when the value is read.
    private var buffer = (Lanes(), Lanes(), Lanes(), Lanes())
    private var buffered = 0
    /// Total bytes fed so far.
    public private(set) var byteCount: UInt64 = 0

    public init() {}

    public static func == (lhs: ShardChecksum, rhs: ShardChecksum) -> Bool {
        lhs.byteCount == rhs.byteCount && lhs.value == rhs.value
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(byteCount)
        hasher.combine(value)
    }

    /// One-shot hash of `bytes`.
    public static func hash(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var checksum = ShardChecksum()
        checksum.update(bytes)
        return checksum.value
    }

    /// One-shot hash of `bytes`.
    public static func hash(_ bytes: [UInt8]) -> UInt64 {
        bytes.withUnsafeBytes { hash($0) }
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
    /// on the hash's own loads — an exponent test on both halves of each 64-bit lane — so a
    /// sender that must both check and hash rows it has not read yet touches them once.
    public mutating func updateCheckingFinite(float32 bytes: UnsafeRawBufferPointer) -> Bool {
        precondition(bytes.count % 4 == 0 && byteCount % 4 == 0, "updateCheckingFinite(float32:) needs whole Float32 values (\(bytes.count) bytes after \(byteCount))")
        return feed(bytes, checkingFloats: true)
    }

    /// The hash's update; with `checkingFloats`, also whether no Float32 in `bytes` is NaN or
    /// infinite (meaningful only at 4-byte alignment relative to the values, see above).
    @inline(__always)
    private mutating func feed(_ bytes: UnsafeRawBufferPointer, checkingFloats: Bool) -> Bool {
        guard !bytes.isEmpty, var input = bytes.baseAddress else { return true }
        byteCount &+= UInt64(bytes.count)
        var remaining = bytes.count
        var flags = Lanes()

        // Keep everything while it fits: short inputs have their own hashes, and a stripe is
        // hashed as a regular one only when more bytes follow it.
        if buffered + remaining <= Self.bufferBytes {
            keep(input, remaining, checkingFloats: checkingFloats, flags: &flags)
            return flags == Lanes()
        }
        if buffered > 0 {
            let fill = Self.bufferBytes - buffered
            keep(input, fill, checkingFloats: checkingFloats, flags: &flags)
            let full = buffer
            withUnsafeBytes(of: full) { consume($0.baseAddress!, stripes: Self.bufferBytes / Self.stripeBytes, checkingFloats: false, flags: &flags) }
            buffered = 0
            input += fill
            remaining -= fill
        }
        if remaining > Self.bufferBytes {
            // Hot path: stripes straight from the caller's memory, all but the last one.
            let stripes = (remaining - 1) / Self.stripeBytes
            consume(input, stripes: stripes, checkingFloats: checkingFloats, flags: &flags)
            input += stripes * Self.stripeBytes
            remaining -= stripes * Self.stripeBytes
            withUnsafeMutableBytes(of: &buffer) { kept in
                kept.baseAddress!.advanced(by: Self.bufferBytes - Self.stripeBytes).copyMemory(from: input - Self.stripeBytes, byteCount: Self.stripeBytes)
            }
        }
        keep(input, remaining, checkingFloats: checkingFloats, flags: &flags)
        return flags == Lanes()
    }

    /// Appends `count` bytes to the buffer (they fit), testing them as floats if asked.
    @inline(__always)
    private mutating func keep(_ input: UnsafeRawPointer, _ count: Int, checkingFloats: Bool, flags: inout Lanes) {
        if checkingFloats {
            var scalar: UInt64 = 0
            for at in stride(from: 0, to: count, by: 4) {
                scalar |= Self.nonFiniteFlags(UInt64(UInt32(littleEndian: input.loadUnaligned(fromByteOffset: at, as: UInt32.self))))
            }
            flags[0] |= scalar
        }
        let start = buffered
        withUnsafeMutableBytes(of: &buffer) { kept in
            kept.baseAddress!.advanced(by: start).copyMemory(from: input, byteCount: count)
        }
        buffered += count
    }

    /// Hashes `stripes` whole stripes at `input` as the next regular stripes of the input.
    @inline(__always)
    private mutating func consume(_ input: UnsafeRawPointer, stripes: Int, checkingFloats: Bool, flags: inout Lanes) {
        Self.keys.withUnsafeBufferPointer { keys in
            var done = 0
            while done < stripes {
                let take = min(Self.stripesPerBlock - stripesInBlock, stripes - done)
                Self.accumulate(&accumulators, input + done * Self.stripeBytes, stripes: take, keys: keys.baseAddress! + stripesInBlock,
                                checkingFloats: checkingFloats, flags: &flags)
                stripesInBlock += take
                done += take
                if stripesInBlock == Self.stripesPerBlock {
                    let a = accumulators
                    accumulators = ((a ^ (a &>> 47)) ^ keys[Self.scrambleKeyIndex]) &* Self.prime32_1
                    stripesInBlock = 0
                }
            }
        }
    }

    /// `acc[i] += lo32(d[i] ^ k[i]) · hi32(d[i] ^ k[i])` and `acc[i ^ 1] += d[i]` for each stripe
    /// d with its key k (no scrambling in between: the caller stays within one block).
    @inline(__always)
    private static func accumulate(_ accumulators: inout Lanes, _ input: UnsafeRawPointer, stripes: Int, keys: UnsafePointer<Lanes>,
                                   checkingFloats: Bool, flags: inout Lanes) {
        let low32 = Lanes(repeating: 0xFFFF_FFFF)
        var products = Lanes()
        var sums = Lanes()
        for stripe in 0..<stripes {
            let p = input + stripe * stripeBytes
            // The sender's rows come straight from a mapped file, i.e. from memory; the
            // receiver hashes bytes it has just copied, which are in cache.
            if checkingFloats { Prefetch.read(p + Prefetch.distance) }
            let data = p.loadUnaligned(as: Lanes.self)
            let keyed = data ^ keys[stripe]
            products &+= (keyed & low32) &* (keyed &>> 32)
            sums &+= data
            if checkingFloats { flags |= nonFiniteFlags(data) }
        }
        accumulators &+= products &+ Lanes(sums[1], sums[0], sums[3], sums[2], sums[5], sums[4], sums[7], sums[6])
    }

    /// The hash of everything fed so far; feeding may continue afterwards.
    public var value: UInt64 {
        let length = Int(byteCount)
        let kept = buffer
        if length <= Self.shortInputLimit {
            return withUnsafeBytes(of: kept) { Self.shortHash($0.baseAddress!, length) }
        }
        var state = self
        var flags = Lanes()
        var lastStripe = Lanes()
        withUnsafeBytes(of: kept) { raw in
            let base = raw.baseAddress!
            if buffered >= Self.stripeBytes {
                state.consume(base, stripes: (buffered - 1) / Self.stripeBytes, checkingFloats: false, flags: &flags)
                lastStripe = base.loadUnaligned(fromByteOffset: buffered - Self.stripeBytes, as: Lanes.self)
            } else {
                // The last stripe straddles the bytes hashed before and the tail.
                let before = Self.stripeBytes - buffered
                withUnsafeMutableBytes(of: &lastStripe) { stripe in
                    stripe.baseAddress!.copyMemory(from: base + Self.bufferBytes - before, byteCount: before)
                    stripe.baseAddress!.advanced(by: before).copyMemory(from: base, byteCount: buffered)
                }
            }
        }
        withUnsafeBytes(of: lastStripe) { stripe in
            Self.keys.withUnsafeBufferPointer { keys in
                Self.accumulate(&state.accumulators, stripe.baseAddress!, stripes: 1, keys: keys.baseAddress! + Self.lastStripeKeyIndex,
                                checkingFloats: false, flags: &flags)
            }
        }
        let a = state.accumulators
        var result = byteCount &* Self.prime64_1
        for pair in 0..<4 {
            result &+= Self.foldedProduct(a[2 * pair] ^ Self.secretWord(11 + 16 * pair), a[2 * pair + 1] ^ Self.secretWord(19 + 16 * pair))
        }
        return Self.avalanche(result)
    }

    // MARK: Inputs of 0 … 240 bytes

    private static func shortHash(_ p: UnsafeRawPointer, _ length: Int) -> UInt64 {
        let count = UInt64(length)
        switch length {
        case 0:
            return xxh64Avalanche(secretWord(56) ^ secretWord(64))
        case 1...3:
            let first = UInt32(p.load(as: UInt8.self))
            let middle = UInt32(p.load(fromByteOffset: length >> 1, as: UInt8.self))
            let last = UInt32(p.load(fromByteOffset: length - 1, as: UInt8.self))
            let combined = (first << 16) | (middle << 24) | last | (UInt32(length) << 8)
            let bitflip = UInt64(secretHalfWord(0) ^ secretHalfWord(4))
            return xxh64Avalanche(UInt64(combined) ^ bitflip)
        case 4...8:
            let high = UInt64(load32(p, 0))
            let low = UInt64(load32(p, length - 4))
            let keyed = (low &+ (high << 32)) ^ (secretWord(8) ^ secretWord(16))
            var h = keyed ^ rotl(keyed, 49) ^ rotl(keyed, 24)
            h &*= primeMX2
            h ^= (h >> 35) &+ count
            h &*= primeMX2
            return h ^ (h >> 28)
        case 9...16:
            let low = load64(p, 0) ^ (secretWord(24) ^ secretWord(32))
            let high = load64(p, length - 8) ^ (secretWord(40) ^ secretWord(48))
            return avalanche(count &+ low.byteSwapped &+ high &+ foldedProduct(low, high))
        case 17...128:
            var acc = count &* prime64_1
            let pairs = (length - 1) / 32   // 16-byte pieces taken from each end, minus one
            for i in 0...pairs {
                acc &+= mix16(p, 16 * i, secret: 32 * i)
                acc &+= mix16(p, length - 16 * (i + 1), secret: 32 * i + 16)
            }
            return avalanche(acc)
        default:
            var acc = count &* prime64_1
            for i in 0..<8 { acc &+= mix16(p, 16 * i, secret: 16 * i) }
            acc = avalanche(acc)
            for i in 8..<(length / 16) { acc &+= mix16(p, 16 * i, secret: 16 * (i - 8) + 3) }
            acc &+= mix16(p, length - 16, secret: 136 - 17)
            return avalanche(acc)
        }
    }

    @inline(__always)
    private static func mix16(_ p: UnsafeRawPointer, _ offset: Int, secret at: Int) -> UInt64 {
        foldedProduct(load64(p, offset) ^ secretWord(at), load64(p, offset + 8) ^ secretWord(at + 8))
    }

    // MARK: Helpers

    @inline(__always)
    private static func secretWord(_ offset: Int) -> UInt64 {
        secret.withUnsafeBytes { load64($0.baseAddress!, offset) }
    }

    @inline(__always)
    private static func secretHalfWord(_ offset: Int) -> UInt32 {
        secret.withUnsafeBytes { load32($0.baseAddress!, offset) }
    }

    @inline(__always)
    private static func load64(_ p: UnsafeRawPointer, _ offset: Int) -> UInt64 {
        UInt64(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    @inline(__always)
    private static func load32(_ p: UnsafeRawPointer, _ offset: Int) -> UInt32 {
        UInt32(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    /// The 128-bit product of `a` and `b`, its halves xored.
    @inline(__always)
    private static func foldedProduct(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let product = a.multipliedFullWidth(by: b)
        return product.high ^ product.low
    }

    @inline(__always)
    private static func avalanche(_ h: UInt64) -> UInt64 {
        var h = h ^ (h >> 37)
        h &*= primeMX1
        return h ^ (h >> 32)
    }

    @inline(__always)
    private static func xxh64Avalanche(_ h: UInt64) -> UInt64 {
        var h = h ^ (h >> 33)
        h &*= prime64_2
        h ^= h >> 29
        h &*= prime64_3
        return h ^ (h >> 32)
    }

    @inline(__always)
    private static func rotl(_ x: UInt64, _ r: UInt64) -> UInt64 {
        (x << r) | (x >> (64 - r))
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

    /// ``nonFiniteFlags(_:)`` of each lane.
    @inline(__always)
    private static func nonFiniteFlags(_ words: Lanes) -> Lanes {
        let exponents = Lanes(repeating: 0x7F80_0000_7F80_0000)
        let t = (words & exponents) ^ exponents
        return (t &- Lanes(repeating: 0x0000_0001_0000_0001)) & ~t & Lanes(repeating: 0x8000_0000_8000_0000)
    }
}
