import Foundation
import LoRAGACore
import LoRAGAFormats
import LoRAGADaemon

/// `lora-ga verify`: the exact fidelity ratio of an adapter against the gradient files.
/// The residual ‖P_B G + G P_A − G‖ is computed exactly in two streamed passes; the optimum
/// ‖G − G_2r‖ comes from a planted spectrum when the gradients are synthetic
/// (`planted-spectrum.json`), else from a double-precision SVD of the summed layer.
public struct AdapterVerifier {
    public struct LayerResult: Sendable, Codable {
        public var name: String
        public var ratio: Double
        public var residual: Double
        public var optimum: Double
        public var spectrumSource: String
    }

    /// Layers above this many elements are not SVD'd exactly (time and memory grow fast).
    public static let exactSVDLimit = 64 << 20

    public let files: GradientFileSet
    public let adapterDirectory: String
    public let plantedSpectra: [String: [Double]]

    public init(files: GradientFileSet, adapterDirectory: String, plantedSpectrumPaths: [String]) throws {
        self.files = files
        self.adapterDirectory = adapterDirectory
        var spectra: [String: [Double]] = [:]
        for path in plantedSpectrumPaths {
            guard let data = FileManager.default.contents(atPath: path) else { continue }
            do {
                let file = try JSONDecoder().decode(PlantedSpectrumFile.self, from: data)
                spectra.merge(file.layers) { first, _ in first }
            } catch {
                throw JobError(.badInput, "\(path): not a planted spectrum file (\(error))")
            }
        }
        self.plantedSpectra = spectra
    }

    public func verify(progress: (LayerResult) -> Void = { _ in }) throws -> [LayerResult] {
        BLAS.configureThreads()
        let adapterPath = (adapterDirectory as NSString).appendingPathComponent(PEFTAdapter.weightsFileName)
        let adapter = try SafeTensorsFile(path: adapterPath)
        var results: [LayerResult] = []
        var checked = 0
        for layer in files.layers {
            let nameA = PEFTAdapter.tensorName(module: layer.moduleName, factor: "A")
            let nameB = PEFTAdapter.tensorName(module: layer.moduleName, factor: "B")
            guard let infoA = adapter.tensor(named: nameA), let infoB = adapter.tensor(named: nameB) else { continue }
            guard infoA.shape.count == 2, infoB.shape.count == 2, infoA.shape[0] == infoB.shape[1] else {
                throw JobError(.badInput, "\(adapterPath): factors of '\(layer.moduleName)' have shapes \(infoA.shape) and \(infoB.shape), which do not multiply")
            }
            let rank = infoA.shape[0]
            let factors: LoRAFactors
            if infoA.shape[1] == layer.cols, infoB.shape[0] == layer.rows {
                factors = LoRAFactors(
                    a: Matrix(rows: rank, cols: layer.cols, storage: try adapter.readAll(nameA)),
                    b: Matrix(rows: layer.rows, cols: rank, storage: try adapter.readAll(nameB)))
            } else if infoA.shape[1] == layer.rows, infoB.shape[0] == layer.cols {
                // fan_in_fan_out: the gradient is stored [in, out], the adapter in PEFT's [out, in] terms.
                factors = LoRAFactors(
                    a: Matrix(rows: layer.cols, cols: rank, storage: try adapter.readAll(nameB)).transposed(),
                    b: Matrix(rows: rank, cols: layer.rows, storage: try adapter.readAll(nameA)).transposed())
            } else {
                throw JobError(.badInput, "\(adapterPath): factors of '\(layer.moduleName)' have shapes \(infoA.shape) and \(infoB.shape), which do not fit the gradient's \(layer.rows)×\(layer.cols)")
            }
            var accumulator = try FidelityAccumulator(factors: factors)
            var blocks = files.rowBlocks(of: layer)
            try blocks.forEachRowBlock { accumulator.add($0) }
            try blocks.forEachRowBlock { accumulator.addResidual($0) }
            let optimum: Double
            let source: String
            if let planted = plantedSpectra[layer.name] {
                optimum = planted.dropFirst(2 * rank).reduce(0) { $0 + $1 * $1 }.squareRoot()
                source = "planted"
            } else {
                guard layer.rows * layer.cols <= AdapterVerifier.exactSVDLimit else {
                    throw JobError("layer '\(layer.name)' (\(layer.rows)×\(layer.cols)) is too large for an exact SVD here; verify synthetic gradients via their planted-spectrum.json")
                }
                var whole = Matrix(rows: layer.rows, cols: layer.cols)
                try blocks.forEachRowBlock { whole.addRows($0) }
                optimum = try whole.exactSingularValues().dropFirst(2 * rank).reduce(0) { $0 + $1 * $1 }.squareRoot()
                source = "exact SVD"
            }
            let ratio = Fidelity.ratio(residualNorm: accumulator.residualNorm, tailNorm: optimum, gradientNorm: accumulator.gradientNormSquared.squareRoot())
            let result = LayerResult(name: layer.name, ratio: ratio, residual: accumulator.residualNorm, optimum: optimum, spectrumSource: source)
            results.append(result)
            progress(result)
            checked += 1
        }
        guard checked > 0 else {
            throw JobError(.badInput, "\(adapterPath) has no lora_A/lora_B pair for any layer of the gradient files (expected names like \(PEFTAdapter.tensorName(module: files.layers[0].moduleName, factor: "A")))")
        }
        return results
    }
}

