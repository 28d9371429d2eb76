import LoRAGACore
import LoRAGAFormats

/// Typed values of the shared declarations (``SettingsCatalog/factors`` and the dtypes), so
/// every executable turns the same text into the same job.
extension ResolvedSettings {
    /// A setting whose words are an enum's raw values (`--mode power`); case does not matter.
    public func choice<T: RawRepresentable & CaseIterable>(_ name: String, as type: T.Type = T.self) throws -> T where T.RawValue == String {
        guard let (text, source) = text(name) else { throw JobError(.usage, LayeredSettings.missing(name)) }
        guard let value = T.allCases.first(where: { $0.rawValue.lowercased() == text.lowercased() }) else {
            throw JobError(.usage, "\(source): '\(text)' is not a valid \(name) (expected one of \(T.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return value
    }

    /// A tensor dtype setting (`adapter-dtype`, `payload-dtype`): f32, bf16 or f16.
    public func dtype(_ name: String) throws -> TensorDType {
        guard let (text, source) = text(name) else { throw JobError(.usage, LayeredSettings.missing(name)) }
        guard let dtype = TensorDType(text), dtype.isWritableFromFloat else {
            throw JobError(.usage, "\(source): '\(text)' is not a valid \(name) (expected one of \(TensorDType.writableCases.map(\.argumentName).joined(separator: ", ")))")
        }
        return dtype
    }

    /// The LoRA-GA factors and randomized SVD of ``SettingsCatalog/factors``, validated.
    /// - Parameter microBatches: `--micro-batches`, or what the caller derived when it is not
    ///   given (the files' metadata where they are read, else 1).
    public func jobSettings(microBatches: Int) throws -> JobSettings {
        let rank: Int = try required("rank")
        let method: LoRAMethod = try choice("method")
        let scale: LoRAGAScale
        switch try required("scale", as: String.self) {
        case "unit": scale = .unit
        case "gd": scale = .gd
        default: scale = .stable(gamma: try value("gamma") ?? method.defaultGamma)
        }
        let lora = LoRAConfiguration(
            rank: rank, alpha: try value("alpha") ?? Double(2 * rank), useRSLoRA: try flag("rslora"),
            direction: try choice("direction"), scale: scale, method: method,
            convention: try choice("convention"), microBatches: microBatches, fanInFanOut: try flag("fan-in-fan-out"))
        let job = JobSettings(
            lora: lora, mode: try choice("mode"),
            oversampling: try value("oversampling"), passes: try value("passes"), sketchWidth: try value("sketch-width"),
            seed: try required("seed"))
        let problems = job.validationErrors()
        guard problems.isEmpty else { throw JobError(.usage, problems.joined(separator: "; ")) }
        return job
    }
}

/// Passing settings to another lora-ga executable as settings: the values go by declaration,
/// never as a command line rebuilt by hand.
extension ResolvedSettings {
    /// These settings as `schema` reads them: every setting `schema` shares with this one
    /// (the same declaration) that was set here, then `overrides` (setting name → value).
    /// `config` is not passed: its values are already resolved here.
    public func passed(to schema: SettingsSchema, overriding overrides: [String: [String]] = [:]) throws -> ResolvedSettings {
        var flags: [String: [String]] = [:]
        for setting in schema.settings where setting.name != "config" {
            guard let own = self.schema.setting(setting.name) else { continue }
            precondition(own == setting, "\(self.schema.command) and \(schema.command) declare '\(setting.name)' differently")
            if own.kind == .paths {
                let list = list(setting.name)
                if !list.isEmpty { flags[setting.name] = list }
            } else if let (text, source) = text(setting.name), !source.hasPrefix("default") {
                flags[setting.name] = [text]
            }
        }
        flags.merge(overrides) { $1 }
        return try ResolvedSettings(schema: schema, flags: flags, layers: LayeredSettings(configFile: nil, environment: [:]))
    }

    /// Every setting given (not left to its declared default) as its `LORA_GA_<NAME>`
    /// variable: how a child process that declares the same settings receives them.
    public func environmentVariables() throws -> [String: String] {
        var variables: [String: String] = [:]
        for setting in schema.settings {
            if setting.kind == .paths {
                let list = list(setting.name)
                if let bad = list.first(where: { $0.contains(",") }) {
                    throw JobError(.usage, "\(bad): a path with a comma cannot be passed in \(setting.environmentName) (comma-separated); rename or link it")
                }
                if !list.isEmpty { variables[setting.environmentName] = list.joined(separator: ",") }
            } else if let (text, source) = text(setting.name), !source.hasPrefix("default") {
                variables[setting.environmentName] = text
            }
        }
        return variables
    }

    /// The environment of a child process that reads `child` (see ``passed(to:overriding:)``):
    /// `inherited` without the variables of this executable's own settings (resolved here
    /// already, a `--config` file's included), plus `child`'s. Variables of settings only the
    /// child has stay, so they still reach it.
    public func environment(for child: ResolvedSettings, inheriting inherited: [String: String]) throws -> [String: String] {
        let resolvedHere = Set(schema.settings.map(\.environmentName))
        var environment = inherited.filter { !resolvedHere.contains($0.key) }
        environment.merge(try child.environmentVariables()) { $1 }
        return environment
    }
}
