import ArgumentParser
import Foundation
import LoRAGACore

@main
struct LoraGA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-ga",
        abstract: "LoRA-GA initializations from summed gradients, by randomized truncated SVD.",
        discussion: """
            Gradients are safetensors files (F32, F16, BF16, F64), one per worker or micro-batch, \
            each holding per-layer tensors [out, in] named like the module weight \
            (e.g. encoder.layer.0.attention.self.query.weight). Tensors with the same name are summed. \
            A tensor may hold a block of its layer (sharded training ranks): the file's metadata \
            "lora_ga.blocks" = {"<tensor>": {"shape": [OUT, IN], "offset": [ROW0, COL0]}} places it; \
            blocks add where they overlap, and a layer they leave partly uncovered is refused \
            unless --allow-uncovered.

            Typical use:
              lora-ga init --rank 8 --out adapter/ grads/worker0 grads/worker1
              lora-ga verify --adapter adapter/ grads/worker0 grads/worker1
            """,
        subcommands: [InitCommand.self, LocalCommand.self, VerifyCommand.self, InspectCommand.self, ExportCommand.self, SynthCommand.self])

    static func main() {
        var command: any ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            exit(withError: error)   // usage errors: no BLAS, nothing to say about it
        }
        // Before any BLAS call and any other thread. Not for the parser's own commands
        // (`lora-ga local --help` parses to ArgumentParser's help).
        if !String(reflecting: type(of: command)).hasPrefix("ArgumentParser."), let note = BLAS.setUpForThisProcess() {
            log("lora-ga: \(note)")
        }
        do {
            try command.run()
        } catch {
            exit(withError: error)
        }
    }
}

/// Progress and diagnostics go to stderr so stdout stays parseable.
func log(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}
