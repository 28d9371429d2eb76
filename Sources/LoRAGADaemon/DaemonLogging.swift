import Foundation
import Logging

/// Log output of every lora-ga executable: `--log-level` and `--log-format text|json`.
public enum LogFormat: String, Sendable, CaseIterable {
    case text, json
}

public enum DaemonLogging {
    /// Sends every logger of the process to stderr in `format`. Call once, first thing.
    public static func bootstrap(format: LogFormat) {
        LoggingSystem.bootstrap { label in
            switch format {
            case .text: StreamLogHandler.standardError(label: label)
            case .json: JSONLogHandler(label: label)
            }
        }
    }

    /// Parses a `--log-level` value (trace, debug, info, notice, warning, error, critical).
    public static func level(_ text: String, source: String) throws -> Logger.Level {
        guard let level = Logger.Level(rawValue: text.lowercased()) else {
            throw JobError(.usage, "\(source): '\(text)' is not a log level (\(Logger.Level.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return level
    }

    /// Parses a `--log-format` value.
    public static func format(_ text: String, source: String) throws -> LogFormat {
        guard let format = LogFormat(rawValue: text.lowercased()) else {
            throw JobError(.usage, "\(source): '\(text)' is not a log format (text, json)")
        }
        return format
    }
}

/// One JSON object per line on stderr: {"ts","level","label","msg", metadata…}; for log
/// collectors that index fields (Loki, Elasticsearch, Cloud Logging).
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    let label: String

    public init(label: String) {
        self.label = label
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var fields: [String: String] = [:]
        for (key, value) in metadata { fields[key] = "\(value)" }
        for (key, value) in metadataProvider?.get() ?? [:] { fields[key] = "\(value)" }
        for (key, value) in event.metadata ?? [:] { fields[key] = "\(value)" }
        fields["ts"] = Self.timestamp()
        fields["level"] = event.level.rawValue
        fields["label"] = label
        fields["msg"] = "\(event.message)"
        FileHandle.standardError.write(Data((Self.line(fields) + "\n").utf8))
    }

    /// A JSON object of string values, keys sorted (so lines diff and grep well).
    public static func line(_ fields: [String: String]) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? String(decoding: encoder.encode(fields), as: UTF8.self)) ?? "{}"
    }

    public static func timestamp() -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: Date())
    }
}
