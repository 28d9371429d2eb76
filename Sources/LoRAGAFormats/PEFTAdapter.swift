import Foundation
import LoRAGACore

/// A PEFT LoRA adapter directory, as `PeftModel.from_pretrained` loads it:
///
/// - `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` [r, in] and
///   `base_model.model.<module>.lora_B.weight` [out, r], metadata `{"format": "pt"}`;
/// - `adapter_config.json`: `peft_type` LORA, r, lora_alpha, target_modules, use_rslora, …
///
/// LoRA-GA factors are not zero-initialized, so the training job must also offset each frozen
/// weight: W ← W − scaling · lora_B @ lora_A (scaling = lora_alpha / r, or / √r with rsLoRA);
/// `lora_ga.attach` does it without touching the base. The config's `lora_ga` key says which
/// method made the factors and whether that offset is needed (LoRA-One: no).
/// With `fanInFanOut` (gradients stored [in, out], GPT-2's Conv1D) the tensors are still
/// PEFT's [r, in] / [out, r] of the layer's function, and the config sets `fan_in_fan_out`.
public enum PEFTAdapter {
    public static let weightsFileName = "adapter_model.safetensors"
    public static let configFileName = "adapter_config.json"

    public static func tensorName(module: String, factor: String) -> String {
        "base_model.model.\(module).lora_\(factor).weight"
    }

    /// Assembles the adapter from per-layer checkpoints, streaming one checkpoint at a time,
    /// so memory stays at one layer's factors however many layers there are.
    /// - Parameter checkpoints: (module name, checkpoint path) in the order to write them.
    public static func assemble(
        checkpoints: [(module: String, path: String)], into directory: String,
        lora: LoRAConfiguration, dtype: TensorDType, baseModel: String? = nil
    ) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        // Shapes first: the safetensors header is written before any data.
        var specs: [SafeTensorsWriter.TensorSpec] = []
        var shapes: [(out: Int, in: Int)] = []
        for (module, path) in checkpoints {
            let checkpoint = try CheckpointFile.read(from: path)
            guard checkpoint.layer == module else {
                throw CheckpointError(path: path, problem: "checkpoint holds layer '\(checkpoint.layer)', not '\(module)'")
            }
            guard checkpoint.rank == lora.rank else {
                throw CheckpointError(path: path, problem: "checkpoint has rank \(checkpoint.rank), the adapter is being written at rank \(lora.rank)")
            }
            // A fan_in_fan_out layer's checkpoint is in the stored [in, out] orientation; PEFT wants
            // lora_A [r, in] and lora_B [out, r] of the layer's function.
            let (outFeatures, inFeatures) = lora.fanInFanOut ? (checkpoint.inFeatures, checkpoint.outFeatures) : (checkpoint.outFeatures, checkpoint.inFeatures)
            specs.append(.init(name: tensorName(module: module, factor: "A"), dtype: dtype, shape: [lora.rank, inFeatures]))
            specs.append(.init(name: tensorName(module: module, factor: "B"), dtype: dtype, shape: [outFeatures, lora.rank]))
            shapes.append((checkpoint.outFeatures, checkpoint.inFeatures))
        }
        let weightsPath = (directory as NSString).appendingPathComponent(weightsFileName)
        let writer = try SafeTensorsWriter(path: weightsPath, tensors: specs, metadata: ["format": "pt"])
        for (index, (module, path)) in checkpoints.enumerated() {
            let checkpoint = try CheckpointFile.read(from: path)
            guard checkpoint.outFeatures == shapes[index].out, checkpoint.inFeatures == shapes[index].in else {
                throw CheckpointError(path: path, problem: "checkpoint changed while the adapter was being assembled")
            }
            var (loraA, loraB) = (checkpoint.loraA, checkpoint.loraB)
            var outFeatures = checkpoint.outFeatures
            if lora.fanInFanOut {
                // Stored B·A = (B_G·A_G)ᵀ, so A_G = Bᵀ and B_G = Aᵀ.
                loraA = Matrix(rows: checkpoint.outFeatures, cols: lora.rank, storage: checkpoint.loraB).transposed().storage
                loraB = Matrix(rows: lora.rank, cols: checkpoint.inFeatures, storage: checkpoint.loraA).transposed().storage
                outFeatures = checkpoint.inFeatures
            }
            try loraA.withUnsafeBufferPointer {
                try writer.write(tensorName(module: module, factor: "A"), rows: 0..<lora.rank, values: $0)
            }
            try loraB.withUnsafeBufferPointer {
                try writer.write(tensorName(module: module, factor: "B"), rows: 0..<outFeatures, values: $0)
            }
        }
        try writer.finish()
        try writeConfig(into: directory, modules: checkpoints.map(\.module), lora: lora, baseModel: baseModel)
    }

    /// The adapter_config.json key describing the initialization.
    public static let methodKey = "lora_ga"

    static func methodDescription(_ lora: LoRAConfiguration) -> [String: Any] {
        var description: [String: Any] = [
            "method": lora.method.rawValue,
            "base_offset": lora.method.needsBaseOffset,
            "gamma": lora.gamma,
        ]
        if lora.method == .loraGA {
            description["convention"] = lora.convention.rawValue
            description["direction"] = lora.direction.rawValue
            description["scale"] = lora.scale.name
            if lora.convention == .peft { description["micro_batches"] = lora.microBatches }
        }
        return description
    }

    /// `adapter_config.json` with the fields PEFT's LoraConfig reads.
    public static func writeConfig(into directory: String, modules: [String], lora: LoRAConfiguration, baseModel: String?) throws {
        let config: [String: Any] = [
            "peft_type": "LORA",
            "task_type": NSNull(),
            "base_model_name_or_path": baseModel.map { $0 as Any } ?? NSNull(),
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": 0.0,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": lora.fanInFanOut,
            "use_rslora": lora.useRSLoRA,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": false,
            "modules_to_save": NSNull(),
            "layers_to_transform": NSNull(),
            "layers_pattern": NSNull(),
            "rank_pattern": [String: Any](),
            "alpha_pattern": [String: Any](),
            "revision": NSNull(),
            // Not a LoraConfig field (PEFT warns and ignores it): tells lora_ga.attach whether the
            // base needs the −scaling·B·A offset and how the factors were made.
            methodKey: methodDescription(lora),
        ]
        let data = try JSONSerialization.data(withJSONObject: config, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
        try DurableFile.write(data, to: (directory as NSString).appendingPathComponent(configFileName))
    }
}
