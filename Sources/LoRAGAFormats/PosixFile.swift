#if canImport(Glibc)
@preconcurrency import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed system call, with the errno it set; callers wrap it in their own
/// error type so the message names the file the user cares about.
struct SystemCallError: Error, CustomStringConvertible {
    let operation: String
    let code: Int32

    var description: String {
        "\(operation) failed: \(String(cString: strerror(code))) (errno \(code))"
    }
}

/// Owner of one POSIX file descriptor, closed exactly once in `deinit`.
///
/// Positional I/O (`pread`/`pwrite`) keeps no shared file offset, and mappings
/// (`withMappedBytes`) last one call, so resident memory stays independent of the file's size.
final class PosixFile {
    let descriptor: Int32

    private init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    deinit {
        close(descriptor)
    }

    /// Opens an existing file for reading.
    static func openForReading(_ path: String) throws -> PosixFile {
        let fd = retryingOnInterrupt { open(path, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { throw SystemCallError(operation: "open", code: errno) }
        return PosixFile(descriptor: fd)
    }

    /// Creates (or truncates) a file for writing; used for `*.tmp` files only.
    static func createForWriting(_ path: String) throws -> PosixFile {
        let fd = retryingOnInterrupt { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
        guard fd >= 0 else { throw SystemCallError(operation: "open for writing", code: errno) }
        return PosixFile(descriptor: fd)
    }

    /// Size in bytes, from `fstat` (so it describes the file actually opened).
    func size() throws -> Int {
        var status = stat()
        guard fstat(descriptor, &status) == 0 else { throw SystemCallError(operation: "fstat", code: errno) }
        return Int(status.st_size)
    }

    /// Calls `body` with `count` bytes at `offset` mapped read-only from the page cache
    /// (`MAP_POPULATE`: the pages are mapped in one go, not faulted in one by one), unmapped
    /// afterwards. The range is checked against the file's size first — touching a mapping
    /// past the end of a file that shrank raises SIGBUS where `pread` would return short.
    func withMappedBytes<T>(count: Int, at offset: Int, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
        guard count > 0 else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
        let fileSize = try size()
        guard offset >= 0, offset + count <= fileSize else {
            throw SystemCallError(operation: "mmap (bytes \(offset)..<\(offset + count) of a \(fileSize)-byte file)", code: EINVAL)
        }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = offset / page * page
        let length = offset + count - start
        #if os(Linux)
        let flags = MAP_SHARED | MAP_POPULATE
        #else
        let flags = MAP_SHARED
        #endif
        guard let base = mmap(nil, length, PROT_READ, flags, descriptor, off_t(start)), base != MAP_FAILED else {
            throw SystemCallError(operation: "mmap", code: errno)
        }
        defer { munmap(base, length) }
        return try body(UnsafeRawBufferPointer(start: base + (offset - start), count: count))
    }

    /// Reads up to `count` bytes at `offset`, looping over short reads;
    /// returns fewer than `count` only at end of file.
    func read(into buffer: UnsafeMutableRawPointer, count: Int, at offset: Int) throws -> Int {
        var done = 0
        while done < count {
            let n = pread(descriptor, buffer + done, count - done, off_t(offset + done))
            if n > 0 {
                done += n
            } else if n == 0 {
                break
            } else if errno != EINTR {
                throw SystemCallError(operation: "pread", code: errno)
            }
        }
        return done
    }

    /// Writes all `count` bytes at `offset`, looping over short writes.
    func write(from buffer: UnsafeRawPointer, count: Int, at offset: Int) throws {
        var done = 0
        while done < count {
            let n = pwrite(descriptor, buffer + done, count - done, off_t(offset + done))
            if n > 0 {
                done += n
            } else if n < 0 && errno != EINTR {
                throw SystemCallError(operation: "pwrite", code: errno)
            } else if n == 0 {
                throw SystemCallError(operation: "pwrite", code: EIO)
            }
        }
    }

    /// Flushes data and metadata to stable storage.
    func sync() throws {
        guard retryingOnInterrupt({ fsync(descriptor) }) == 0 else {
            throw SystemCallError(operation: "fsync", code: errno)
        }
    }

    /// Atomically replaces `destination` by `source`, then fsyncs the directory
    /// so the rename itself survives a power loss.
    static func publish(_ source: String, as destination: String) throws {
        guard rename(source, destination) == 0 else { throw SystemCallError(operation: "rename", code: errno) }
        try syncDirectory(containing: destination)
    }

    /// Removes a file, ignoring errors: used to clean up abandoned temp files.
    static func removeQuietly(_ path: String) {
        unlink(path)
    }

    private static func syncDirectory(containing path: String) throws {
        let directory: String
        if let slash = path.lastIndex(of: "/") {
            directory = slash == path.startIndex ? "/" : String(path[..<slash])
        } else {
            directory = "."
        }
        let fd = retryingOnInterrupt { open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        guard fd >= 0 else { throw SystemCallError(operation: "open directory", code: errno) }
        defer { close(fd) }
        guard retryingOnInterrupt({ fsync(fd) }) == 0 else {
            throw SystemCallError(operation: "fsync directory", code: errno)
        }
    }
}

/// Repeats a system call interrupted by a signal, as POSIX asks callers to.
private func retryingOnInterrupt(_ call: () -> Int32) -> Int32 {
    while true {
        let result = call()
        if result >= 0 || errno != EINTR { return result }
    }
}
