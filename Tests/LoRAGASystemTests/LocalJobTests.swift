import Foundation
import Testing
import LoRAGACore
import LoRAGAFormats
import LoRAGACoordinator
import LoRAGADaemon

/// `lora-ga init` end to end on real gradients, checked by the exact verifier.
@Suite struct LocalJobTests {
    func run(mode: SVDMode, rank: Int = 8, out: String, paths: [String] = Fixtures.minilmWorkers) throws -> [LayerReport] {
        let files = try GradientFileSet(paths: paths)
        let settings = JobSettings(lora: LoRAConfiguration(rank: rank, alpha: Double(2 * rank)), mode: mode)
        var job = try LocalJob(files: files, settings: settings, outputDirectory: out)
        job.estimatesFidelity = true
        return try job.run()
    }

    func verify(_ out: String, paths: [String] = Fixtures.minilmWorkers) throws -> [AdapterVerifier.LayerResult] {
        try AdapterVerifier(files: GradientFileSet(paths: paths), adapterDirectory: out, plantedSpectrumPaths: []).verify()
    }

    @Test(arguments: [SVDMode.dense, .power])
    func everyRealLayerReachesTheOptimum(mode: SVDMode) throws {
        let out = try Fixtures.scratch("real-\(mode)")
        let reports = try run(mode: mode, out: out)
        #expect(reports.count == 12)
        let results = try verify(out)
        #expect(results.count == 12)
        for result in results { #expect(result.ratio <= 1.01, "\(result.name): \(result.ratio)") }
        // The in-product estimate agrees with the exact check to a few parts in a thousand.
        for (report, result) in zip(reports, results) {
            #expect(abs(report.fidelityEstimate! - result.ratio) < 5e-3, "\(report.name)")
        }
    }

    @Test func sketchModeStaysWithinItsBound() throws {
        let out = try Fixtures.scratch()
        _ = try run(mode: .sketch, out: out)
        for result in try verify(out) { #expect(result.ratio <= 1.05, "\(result.name): \(result.ratio)") }
    }

    @Test func adapterHasPEFTLayout() throws {
        let out = try Fixtures.scratch()
        _ = try run(mode: .dense, rank: 4, out: out)
        let adapter = try SafeTensorsFile(path: out + "/adapter_model.safetensors")
        #expect(adapter.metadata["format"] == "pt")
        let a = try #require(adapter.tensor(named: "base_model.model.encoder.layer.0.intermediate.dense.lora_A.weight"))
        let b = try #require(adapter.tensor(named: "base_model.model.encoder.layer.0.intermediate.dense.lora_B.weight"))
        #expect(a.shape == [4, 384] && b.shape == [1536, 4])
        #expect(adapter.tensors.count == 24)
        let config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: out + "/adapter_config.json"))) as! [String: Any]
        #expect(config["peft_type"] as? String == "LORA")
        #expect(config["r"] as? Int == 4)
        #expect((config["target_modules"] as? [String])?.contains("encoder.layer.1.output.dense") == true)
    }

    @Test func sameInputsGiveByteIdenticalAdapters() throws {
        let first = try Fixtures.scratch("first"), second = try Fixtures.scratch("second")
        _ = try run(mode: .power, out: first)
        _ = try run(mode: .power, out: second)
        let a = try Data(contentsOf: URL(fileURLWithPath: first + "/adapter_model.safetensors"))
        let b = try Data(contentsOf: URL(fileURLWithPath: second + "/adapter_model.safetensors"))
        #expect(a == b)
    }

    @Test func rerunResumesAndRefusesADifferentJob() throws {
        let out = try Fixtures.scratch()
        _ = try run(mode: .dense, out: out)
        let before = try Data(contentsOf: URL(fileURLWithPath: out + "/adapter_model.safetensors"))
        // Corrupt one checkpoint: it must be detected and recomputed, the rest reused.
        let checkpoint = out + "/checkpoints/0003.ckpt"
        var bytes = try Data(contentsOf: URL(fileURLWithPath: checkpoint))
        bytes[bytes.count / 2] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: checkpoint))
        var lines: [String] = []
        let files = try GradientFileSet(paths: Fixtures.minilmWorkers)
        let settings = JobSettings(lora: LoRAConfiguration(rank: 8, alpha: 16), mode: .dense)
        _ = try LocalJob(files: files, settings: settings, outputDirectory: out, progress: { lines.append($0) }).run()
        #expect(lines.filter { $0.contains("already finished") }.count == 11)
        #expect(lines.contains { $0.contains("failed its checks") })
        #expect(try Data(contentsOf: URL(fileURLWithPath: out + "/adapter_model.safetensors")) == before)
        // A different rank in the same directory is refused with a clear message.
        let other = JobSettings(lora: LoRAConfiguration(rank: 4, alpha: 8), mode: .dense)
        let error = #expect(throws: JobError.self) { _ = try LocalJob(files: files, settings: other, outputDirectory: out) }
        #expect(error?.message.contains("different job") == true)
    }

    @Test func mismatchedShapesAcrossFilesAreAClearError() throws {
        let dir = try Fixtures.scratch()
        try SafeTensorsWriter.write(path: dir + "/a.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [4, 6]), [Float](repeating: 1, count: 24))])
        try SafeTensorsWriter.write(path: dir + "/b.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [6, 4]), [Float](repeating: 1, count: 24))])
        let error = #expect(throws: GradientSetError.self) { _ = try GradientFileSet(paths: [dir]) }
        #expect(error?.description.contains("x.weight") == true)
        #expect(error?.description.contains("[4, 6]") == true && error?.description.contains("[6, 4]") == true)
    }

    @Test func nonFiniteGradientNamesFileLayerAndRow() throws {
        let dir = try Fixtures.scratch()
        var values = [Float](repeating: 1, count: 40 * 30)
        values[17 * 30 + 3] = .nan
        try SafeTensorsWriter.write(path: dir + "/a.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [40, 30]), [Float](repeating: 1, count: 1200))])
        try SafeTensorsWriter.write(path: dir + "/b.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [40, 30]), values)])
        let error = #expect(throws: GradientError.self) { _ = try run(mode: .dense, rank: 2, out: try Fixtures.scratch("nan-out"), paths: [dir]) }
        #expect(error == .nonFinite(layer: "x.weight", source: dir + "/b.safetensors", row: 17))
    }

    @Test func singleAndSummedFilesStreamTheSameValuesAndChecks() throws {
        let dir = try Fixtures.scratch()
        let rows = 300, cols = 70   // several 128-row blocks, the last one short
        var values = (0..<(rows * cols)).map { Float($0 % 97) - 48 }
        try SafeTensorsWriter.write(path: dir + "/a.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [rows, cols]), values)])
        try SafeTensorsWriter.write(path: dir + "/zero.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [rows, cols]), [Float](repeating: 0, count: rows * cols))])
        func collect(_ paths: [String]) throws -> [Float] {
            let set = try GradientFileSet(paths: paths)
            var blocks = set.rowBlocks(of: set.layers[0])
            var seen: [Float] = []
            try blocks.forEachRowBlock { seen.append(contentsOf: $0.values) }
            return seen
        }
        let mapped = try collect([dir + "/a.safetensors"])                              // one file
        let copied = try collect([dir + "/a.safetensors", dir + "/zero.safetensors"])   // a sum
        #expect(mapped == values && copied == values)
        values[211 * cols + 9] = .infinity
        try SafeTensorsWriter.write(path: dir + "/a.safetensors", tensors: [(.init(name: "x.weight", dtype: .f32, shape: [rows, cols]), values)])
        let error = #expect(throws: GradientError.self) { _ = try collect([dir + "/a.safetensors"]) }
        #expect(error == .nonFinite(layer: "x.weight", source: dir + "/a.safetensors", row: 211))
    }

    @Test func plantedSyntheticGradientsAreVerifiedAgainstTheirSpectrum() throws {
        let dir = try Fixtures.scratch()
        let synth = SyntheticGradients(layers: [.init(name: "s.weight", rows: 300, cols: 500)], workers: 3, plantedRank: 200, decay: 0.8, dtype: .f32, seed: 4)
        try synth.write(to: dir)
        let paths = (0..<3).map { "\(dir)/w\($0)" }
        let out = try Fixtures.scratch("synth-out")
        _ = try run(mode: .power, rank: 8, out: out, paths: paths)
        let results = try AdapterVerifier(files: GradientFileSet(paths: paths), adapterDirectory: out, plantedSpectrumPaths: [dir + "/" + PlantedSpectrumFile.fileName]).verify()
        #expect(results.count == 1 && results[0].spectrumSource == "planted")
        #expect(results[0].ratio <= 1.01 && results[0].ratio >= 0.999)
    }
}
