/// One setting of a daemon, declared once: its name (the flag `--NAME` and the config file
/// key), the type of its value, its default, its help, and its environment variable
/// (`LORA_GA_<NAME>`). Flag parsing, the environment, the config file and `--help` are all
/// derived from these declarations (see ``SettingsSchema``).
public struct Setting: Sendable, Hashable {
    public enum Kind: Sendable, Hashable {
        /// A boolean: `--NAME` on the command line, true/false in the environment and the file.
        case flag
        case int
        case double
        case string
        case path
        /// HOST:PORT.
        case address
        /// One of the listed words.
        case choice([String])
        /// Repeatable flag; comma-separated in the environment and the file.
        case paths
    }

    public let name: String
    public let kind: Kind
    /// The value when no layer sets it, as a flag would spell it; nil when there is none (or
    /// when the default depends on other settings, which `help` then says).
    public let defaultValue: String?
    public let help: String
    /// A one-letter alias (`-o`), if any.
    public let short: Character?

    public init(_ name: String, _ kind: Kind, default defaultValue: String? = nil, short: Character? = nil, help: String) {
        self.name = name
        self.kind = kind
        self.defaultValue = defaultValue
        self.help = help
        self.short = short
    }

    public var environmentName: String { LayeredSettings.environmentName(name) }
    public var configKey: String { name }

    /// What `--help` shows for the value.
    var valueName: String {
        switch kind {
        case .flag: ""
        case .int: "<int>"
        case .double: "<number>"
        case .string: "<text>"
        case .path: "<path>"
        case .address: "<host:port>"
        case .choice(let words): "<\(words.joined(separator: "|"))>"
        case .paths: "<path>"
        }
    }

    /// Checks `text` is a value of this setting's type; the message names `source`.
    public func check(_ text: String, source: String) throws {
        let valid: Bool
        switch kind {
        case .flag: valid = Bool(text.lowercased()) != nil
        case .int: valid = Int(text) != nil
        case .double: valid = Double(text).map { $0.isFinite } ?? false
        case .string, .path, .paths: valid = true
        case .address: _ = try LayeredSettings.hostAndPort(text, setting: source); valid = true
        case .choice(let words): valid = words.contains(text) || words.contains(text.lowercased())
        }
        guard valid else {
            let expected: String
            switch kind {
            case .flag: expected = "true or false"
            case .int: expected = "an integer"
            case .double: expected = "a number"
            case .choice(let words): expected = "one of \(words.joined(separator: ", "))"
            default: expected = "valid"
            }
            throw JobError(.usage, "\(source): '\(text)' is not a valid \(name) (expected \(expected))")
        }
    }
}

/// The settings of one executable, and everything derived from them.
public struct SettingsSchema: Sendable {
    /// What bare (non-option) arguments are, for a command that takes them (`lora-ga init
    /// PATH…`); they are given on the command line only.
    public struct Operands: Sendable, Hashable {
        public let name: String
        public let help: String
        public init(_ name: String, help: String) {
            self.name = name
            self.help = help
        }
    }

    public let command: String
    public let settings: [Setting]
    public let operands: Operands?

    public init(command: String, settings: [Setting], operands: Operands? = nil) {
        self.command = command
        self.settings = settings
        self.operands = operands
        precondition(Set(settings.map(\.name)).count == settings.count, "\(command): a setting is declared twice")
    }

    public func setting(_ name: String) -> Setting? { settings.first { $0.name == name } }
    public var names: [String] { settings.map(\.name) }

    /// Parses command-line arguments (`--name value`, `--name=value`, `--flag`, `-o value`)
    /// into values keyed by setting name (repeatable settings keep every value). Unknown
    /// options are usage errors naming the closest valid one.
    public func parse(arguments: [String]) throws -> [String: [String]] {
        try parseWithOperands(arguments: arguments).values
    }

    /// Like ``parse(arguments:)``, keeping bare arguments (and all after `--`) as operands
    /// when the schema declares them.
    public func parseWithOperands(arguments: [String]) throws -> (values: [String: [String]], operands: [String]) {
        var values: [String: [String]] = [:]
        var operands: [String] = []
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            if self.operands != nil, argument == "--" {
                operands += arguments[index...]
                break
            }
            let setting: Setting
            var inline: String?
            if argument.hasPrefix("--") {
                var name = String(argument.dropFirst(2))
                if let equals = name.firstIndex(of: "=") {
                    inline = String(name[name.index(after: equals)...])
                    name = String(name[..<equals])
                }
                guard let found = self.setting(name) else {
                    throw JobError(.usage, "\(command): unknown option '--\(name)'\(Self.suggestion(for: name, among: names, prefix: "--"))")
                }
                setting = found
            } else if argument.hasPrefix("-"), argument.count == 2, let found = settings.first(where: { $0.short == argument.last }) {
                setting = found
            } else if self.operands != nil, argument == "-" || !argument.hasPrefix("-") {
                operands.append(argument)
                continue
            } else {
                throw JobError(.usage, "\(command): unexpected argument '\(argument)' (every setting is an option: see --help)")
            }
            if setting.kind == .flag {
                let text = inline ?? "true"
                try setting.check(text, source: "--\(setting.name)")
                values[setting.name, default: []].append(text.lowercased())
                continue
            }
            guard let text = inline ?? (index < arguments.count ? arguments[index] : nil) else {
                throw JobError(.usage, "\(command): --\(setting.name) needs a value \(setting.valueName)")
            }
            if inline == nil { index += 1 }
            try setting.check(text, source: "--\(setting.name)")
            values[setting.name, default: []].append(text)
        }
        for (name, given) in values where given.count > 1 && setting(name)!.kind != .paths {
            throw JobError(.usage, "\(command): --\(name) given \(given.count) times")
        }
        return (values, operands)
    }

    /// Fails on a config file key or a `LORA_GA_*` variable that is no setting: a typo there
    /// would otherwise leave the default in force silently. Environment variables may belong
    /// to another lora-ga executable (one environment often serves a coordinator and its
    /// workers), so only names no executable knows are errors.
    public func validate(_ layers: LayeredSettings) throws {
        for key in layers.file.keys.sorted() where setting(key) == nil {
            throw JobError(.usage, "config file \(layers.filePath ?? ""): unknown key '\(key)'\(Self.suggestion(for: key, among: names, prefix: "", quote: true)) (\(command) reads: \(names.joined(separator: ", ")))")
        }
        let known = Set(SettingsCatalog.allEnvironmentNames)
        for name in layers.environment.keys.sorted() where name.hasPrefix("LORA_GA_") && !known.contains(name) {
            throw JobError(.usage, "unknown environment variable \(name)\(Self.suggestion(for: name, among: known.sorted(), prefix: "")) (unset it, or fix its name)")
        }
        for setting in settings {
            if let text = layers.environment[setting.environmentName] { try setting.check(text, source: setting.environmentName) }
            if let text = layers.file[setting.configKey] { try setting.check(text, source: "'\(setting.configKey)' in \(layers.filePath ?? "config")") }
        }
    }

    /// " (did you mean --rank?)" when some name is close to `name`, else "".
    static func suggestion(for name: String, among candidates: [String], prefix: String, quote: Bool = false) -> String {
        guard let best = closest(to: name, among: candidates) else { return "" }
        return quote ? "; did you mean '\(best)'?" : " (did you mean \(prefix)\(best)?)"
    }

    /// The candidate with the smallest edit distance to `name`, if it is close enough to be a typo.
    public static func closest(to name: String, among candidates: [String]) -> String? {
        let scored = candidates.map { ($0, editDistance(name.lowercased(), $0.lowercased())) }
        guard let best = scored.min(by: { $0.1 < $1.1 }) else { return nil }
        return best.1 <= max(2, name.count / 3) ? best.0 : nil
    }

    /// Damerau–Levenshtein (optimal string alignment) distance: swapped neighbours count once.
    public static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var d = [[Int]](repeating: [Int](repeating: 0, count: b.count + 1), count: a.count + 1)
        for i in 0...a.count { d[i][0] = i }
        for j in 0...b.count { d[0][j] = j }
        for i in 1...a.count {
            for j in 1...b.count {
                let cost = a[i - 1] == b[j - 1] ? 0 : 1
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
                if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] { d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1) }
            }
        }
        return d[a.count][b.count]
    }

    /// The SETTINGS section of `--help`, one entry per declaration.
    public func helpText() -> String {
        var lines: [String] = []
        if let operands {
            lines += ["ARGUMENTS", "  <\(operands.name)> ...", "        \(operands.help)", ""]
        }
        lines += ["SETTINGS (flag, then LORA_GA_<NAME> environment variable, then --config file key; flags win over the environment, which wins over the file)"]
        for setting in settings { lines += setting.helpLines }
        return lines.joined(separator: "\n")
    }
}

extension Setting {
    /// This setting's entry in `--help`: the same in every executable that declares it.
    public var helpLines: [String] {
        let flag = (short.map { "-\($0), " } ?? "") + "--\(name)" + (valueName.isEmpty ? "" : " \(valueName)")
        var detail = help
        if let defaultValue { detail += " (default \(defaultValue))" }
        return ["  \(flag)", "        \(detail)",
                "        env \(environmentName), config \"\(configKey)\"\(kind == .paths ? " (comma-separated)" : "")"]
    }
}
