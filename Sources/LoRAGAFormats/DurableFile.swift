import Foundation

/// Small files that must survive a crash whole or not at all (manifests, configs, reports):
/// written to `path.tmp`, fsync'd, renamed onto `path`, and the directory fsync'd.
public enum DurableFile {
    public static func write(_ data: Data, to path: String) throws {
        let temporary = path + ".tmp"
        do {
            let file = try PosixFile.createForWriting(temporary)
            try data.withUnsafeBytes { bytes in
                if let base = bytes.baseAddress { try file.write(from: base, count: bytes.count, at: 0) }
            }
            try file.sync()
            try PosixFile.publish(temporary, as: path)
        } catch {
            PosixFile.removeQuietly(temporary)
            throw DurableFileError(path: path, reason: "\(error)")
        }
    }
}

public struct DurableFileError: Error, CustomStringConvertible {
    public let path: String
    public let reason: String
    public var description: String { "\(path): cannot write it durably (\(reason))" }
}
