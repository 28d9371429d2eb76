/// How a layer's top-2r subspace is found (see “The modes” in the LoRAGACore article).
public enum SVDMode: String, Sendable, CaseIterable, Codable {
    /// Hold the layer's summed gradient, then power iterations in memory. Memory out·in.
    case dense
    /// One streamed pass into range / co-range / core sketches. Memory (out+in)·k.
    case sketch
    /// Power iterations as repeated passes over the gradient's row blocks (files, or workers
    /// over the network); nobody holds the layer. Memory (out+in)·k.
    case power

    /// The u8 code of `JobSpec.mode`.
    public var wireCode: UInt8 {
        switch self {
        case .dense: 0
        case .sketch: 1
        case .power: 2
        }
    }

    /// The mode a wire code names, or `nil` for a code no mode has.
    public init?(wireCode: UInt8) {
        switch wireCode {
        case 0: self = .dense
        case 1: self = .sketch
        case 2: self = .power
        default: return nil
        }
    }
}

extension SVDMode: LosslessStringConvertible {
    /// A name as typed in flags and settings files, in either case: `power`, `Power`.
    public init?(_ text: String) { self.init(rawValue: text.lowercased()) }
    public var description: String { rawValue }
}

/// The smallest settings that keep the fidelity ratio near 1 on real gradients; fewer passes
/// or a narrower sketch fall short, more cost work for little gain (the measurements are in
/// Scripts/bench-results/README.md). Single-pass sketches are weaker on flat spectra: when
/// fidelity matters more than one pass, use `power`.
public enum SVDDefaults {
    /// p = 2r up to r = 16 (k = 4r: the r-th..2r-th directions LoRA-GA uses sit well inside
    /// the sketch), then r + 16: the gain of oversampling saturates in absolute columns while
    /// its cost keeps growing with p.
    public static func oversampling(rank: Int) -> Int { rank + Swift.min(rank, 16) }
    /// Five applications of G/Gᵀ: two full power iterations plus the range pass.
    public static let passes = 5
    /// Single-pass sketches need a much wider range than multi-pass ones for slow decay.
    public static func sketchWidth(rank: Int) -> Int { 4 * rank + 128 }
    public static let seed: UInt64 = 0x10AA_6A
}
