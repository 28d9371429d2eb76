import Foundation

/// Settings for the daemons from three layers, highest first: command-line flags, the
/// environment (`LORA_GA_<KEY>`, e.g. `LORA_GA_LISTEN`), then a JSON config file
/// (`{"listen": "0.0.0.0:7070", "workers": 4, …}`, keys spelled like the flags). Whatever
/// none of them sets keeps its built-in default. ``SettingsSchema/validate(_:)`` checks the
/// layers against an executable's declared settings.
public struct LayeredSettings: Sendable {
    public let file: [String: String]
    public let filePath: String?
    public let environment: [String: String]

    /// - Parameter configFile: a JSON object of scalars; nil for none.
    public init(configFile: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws {
        self.filePath = configFile
        self.environment = environment
        guard let configFile else {
            self.file = [:]
            return
        }
        guard let data = FileManager.default.contents(atPath: configFile) else {
            throw JobError(.usage, "config file \(configFile): cannot read it")
        }
        let decoded: [String: Scalar]
        do {
            decoded = try JSONDecoder().decode([String: Scalar].self, from: data)
        } catch {
            throw JobError(.usage, "config file \(configFile): expected a JSON object of strings, numbers and booleans (\(error))")
        }
        var values: [String: String] = [:]
        for (key, value) in decoded where !key.hasPrefix("_") {   // "_comment" keys document the file
            values[key] = value.text
        }
        self.file = values
    }

    /// One JSON scalar, kept as the text a flag would have carried.
    struct Scalar: Decodable {
        let text: String
        init(from decoder: Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let value = try? container.decode(Bool.self) { text = value ? "true" : "false" }
            else if let value = try? container.decode(Int.self) { text = String(value) }
            else if let value = try? container.decode(Double.self) { text = String(value) }
            else { text = try container.decode(String.self) }
        }
    }

    public static func environmentName(_ key: String) -> String {
        "LORA_GA_" + key.uppercased().replacingOccurrences(of: "-", with: "_")
    }

    /// The raw text of `key` and where it came from, or nil when no layer sets it.
    public func text(_ key: String, flag: String?) -> (value: String, source: String)? {
        if let flag { return (flag, "--\(key)") }
        let name = LayeredSettings.environmentName(key)
        if let value = environment[name] { return (value, name) }
        if let value = file[key] { return (value, "'\(key)' in \(filePath ?? "config")") }
        return nil
    }

    /// The message for a setting nobody gave.
    public static func missing(_ key: String) -> String {
        "missing setting '\(key)': pass --\(key), set \(environmentName(key)), or put \"\(key)\" in the config file"
    }

    /// Parses `HOST:PORT` (IPv6 as `[::1]:7070`).
    public static func hostAndPort(_ text: String, setting: String) throws -> (host: String, port: Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            throw JobError(.usage, "\(setting) '\(text)' is not HOST:PORT (e.g. 127.0.0.1:7070)")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw JobError(.usage, "\(setting) '\(text)' has no host") }
        return (host, port)
    }
}
