/// How a layer's top-2r subspace is found (DESIGN.md §2).
public enum SVDMode: String, Sendable, CaseIterable, Codable {
    /// Hold the layer's summed gradient, then power iterations in memory. Memory out·in.
    case dense
    /// One streamed pass into range / co-range / core sketches. Memory (out+in)·k.
    case sketch
    /// Power iterations as repeated passes over the gradient's row blocks (files, or workers
    /// over the network); nobody holds the layer. Memory (out+in)·k.
    case power
}

/// Defaults measured on real gradients (MiniLM sample, r = 8 and 16, worst layer of 12):
///
/// | method                          | r = 8  | r = 16 |
/// |---------------------------------|--------|--------|
/// | power, p = 2r, 4 passes         | 1.0054 | 1.0018 |
/// | power, p = 2r, 5 passes (ours)  | 1.0007 | 1.0001 |
/// | power, p = 1.5r, 5 passes        | 1.0020 | 1.0006 |
/// | power, p = 2r, 6 passes         | 1.0005 | 1.0001 |
/// | sketch, k = 96                  | 1.0378 | 1.1342 |
/// | sketch, k = 128                 | 1.0102 | 1.0397 |
/// | sketch, k = 4r + 128 (ours)     | 1.0022 | 1.0024 |
///
/// Single-pass sketches do worse on planted flat spectra (s_i ∝ i^-0.8, 1024×2048, r = 16:
/// 1.13 at k = 192, 1.08 at k = 256): real gradients decay faster than that in their head.
/// When fidelity matters more than one pass, use `power`.
public enum SVDDefaults {
    /// p = 2r up to r = 16 (k = 4r: the r-th..2r-th directions LoRA-GA uses sit well inside
    /// the sketch), then r + 16: the gain of oversampling saturates in absolute columns
    /// (planted i^-0.8 spectrum, r = 32: p = 1.5r gives 1.0006 against 1.0002 for 2r) while
    /// its cost grows linearly (-12.5 % GEMM work at r = 32).
    public static func oversampling(rank: Int) -> Int { rank + Swift.min(rank, 16) }
    /// Five applications of G/Gᵀ: two full power iterations plus the range pass.
    public static let passes = 5
    /// Single-pass sketches need a much wider range than multi-pass ones for slow decay.
    public static func sketchWidth(rank: Int) -> Int { 4 * rank + 128 }
    public static let seed: UInt64 = 0x10AA_6A
}
