import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

/// Runs a daemon's job under a ServiceGroup so SIGTERM / SIGINT end it gracefully:
/// `onSignal` asks the job to stop (say goodbye, leave a resumable directory), and `run`
/// returns what the job returned or threw. A job that fails after a signal failed because
/// of it: that failure is reported as ``JobError/Kind/interrupted`` (resumable, exit 75).
public enum GracefulJob {
    public static func run<Result: Sendable>(
        logger: Logger,
        _ job: @escaping @Sendable () async throws -> Result,
        onSignal: @escaping @Sendable () async -> Void
    ) async throws -> Result {
        let outcome = NIOLockedValueBox<Swift.Result<Result, Error>?>(nil)
        let signalled = NIOLockedValueBox(false)
        let service = JobService(job: {
            let result: Swift.Result<Result, Error>
            do { result = .success(try await job()) } catch { result = .failure(error) }
            outcome.withLockedValue { $0 = result }
        }, onSignal: {
            signalled.withLockedValue { $0 = true }
            await onSignal()
        })
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: service, successTerminationBehavior: .gracefullyShutdownGroup)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
        let wasSignalled = signalled.withLockedValue { $0 }
        guard let result = outcome.withLockedValue({ $0 }) else {
            throw JobError(wasSignalled ? .interrupted : .other, "stopped before the job returned")
        }
        switch result {
        case .success(let value): return value
        case .failure(let error as ClassifiedError) where error.kind == .interrupted: throw error
        case .failure(let error) where wasSignalled: throw JobError(.interrupted, "stopped by a termination signal (\(error))")
        case .failure(let error): throw error
        }
    }

    struct JobService: Service {
        let job: @Sendable () async -> Void
        let onSignal: @Sendable () async -> Void

        func run() async throws {
            await withGracefulShutdownHandler {
                await job()
            } onGracefulShutdown: {
                Task { await onSignal() }
            }
        }
    }
}
