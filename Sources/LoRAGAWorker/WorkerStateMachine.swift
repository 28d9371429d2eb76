import LoRAGADaemon
import LoRAGAFormats
import LoRAGAWire

/// Why a worker stopped without the job finishing.
public struct WorkerError: ClassifiedError, CustomStringConvertible, Equatable {
    public let message: String
    /// The coordinator refused this worker (bad id, shapes, secret…): retrying cannot help.
    public let isFinal: Bool
    /// Which kind of failure (and so which exit status) this is, decided where it is raised.
    public var kind: JobError.Kind = .other
    public var description: String { message }
}

extension WireErrorCode {
    /// The kind of failure a worker refused with this code has.
    var failureKind: JobError.Kind {
        switch self {
        case .badAuth: .authentication
        case .shapeMismatch, .layerMismatch, .badData: .badInput
        case .duplicateWorker, .badVersion: .usage
        case .internal, .jobFailed: .other
        }
    }
}

/// The worker's side of a job as a pure value: connecting with backoff until a deadline, the
/// handshake, the layers the coordinator has begun, and when to give up. It is fed events (a
/// connect attempt's outcome, each message from the coordinator, the end of a connection, a
/// failure reading its own files, cancellation), with the clock's reading passed in where
/// time matters, and returns actions that carry their data. ``WorkerClient`` carries them out:
/// it owns the sockets, the gradient files, the thread pool and the clock.
///
/// Rules it decides:
/// - connect attempts back off from 100 ms, doubling up to 5 s; a connection that opens resets
///   the backoff, and one that ends starts a new connect deadline: the worker gives up
///   (resumable, exit 75) only after `connectTimeout` without reaching the coordinator;
/// - cancellation (a termination signal) stops the worker at once, never retrying;
/// - a failed TLS handshake, a refusal, a peer that is not a coordinator and any message out
///   of order are final, since retrying cannot help; a refusal's code gives the failure kind;
/// - the coordinator's `badData` error while serving is not final (it refused something this
///   worker sent, e.g. a damaged shard): reconnect and resend; every other error is final;
/// - a `Goodbye` or a dropped connection means reconnect; the coordinator replays what is owed;
/// - a layer the files lack, or a power request before its `LayerBegin`, is final;
/// - unreadable or bad data in the worker's files: tell the coordinator, then stop (exit 3).
public struct WorkerStateMachine: Sendable {
    public struct Configuration: Sendable, Equatable {
        public var workerID: String
        /// `host:port`, for messages.
        public var coordinator: String
        /// How long to keep trying to reach the coordinator, from the start or a lost connection.
        public var connectTimeout: Duration
        /// Sent in every Hello of this run, so the coordinator sees one worker session.
        public var sessionNonce: UInt64
        public var firstRetryDelay: Duration = .milliseconds(100)
        public var maxRetryDelay: Duration = .seconds(5)

        public init(workerID: String, coordinator: String, connectTimeout: Duration, sessionNonce: UInt64) {
            self.workerID = workerID
            self.coordinator = coordinator
            self.connectTimeout = connectTimeout
            self.sessionNonce = sessionNonce
        }
    }

    /// Why a connect attempt or a connection failed, as far as the machine needs to know.
    public struct ConnectionFailure: Sendable, Equatable {
        public var description: String
        /// The TLS handshake failed: the configuration must change.
        public var isTLS: Bool

        public init(_ description: String, isTLS: Bool = false) {
            self.description = description
            self.isTLS = isTLS
        }
    }

    public enum Action: Sendable, Equatable {
        /// Open a connection; report `connected` or `connectFailed`.
        case connect
        /// Log `because`, wait `after`, then connect.
        case retry(after: Duration, because: String)
        /// Log `because` (a connection ended), then connect at once.
        case reconnect(because: String)
        /// Answer the challenge: a Hello with this session nonce and the proof for `challenge`.
        case sendHello(challenge: Challenge, sessionNonce: UInt64)
        /// Joined `spec`'s job: announce the layers this worker's files hold.
        case sendAnnounce(JobSpec)
        /// Stream the layer as shards and commit it (dense, sketch).
        case streamLayer(LayerBegin, GradientLayer, JobSpec)
        /// Multiply the layer's gradient as asked and send the reply (power).
        case answerPower(PowerRequest, GradientLayer)
        /// Drop what the reader holds for the layer.
        case releaseLayer(GradientLayer)
        /// Best effort: tell the coordinator why this worker stops.
        case sendError(ErrorMessage)
        /// End this connection; then report `connectionClosed`.
        case closeConnection
        /// The job is done: close the connection and return the adapter path.
        case finish(JobDone)
        case fail(WorkerError)
        /// Cancelled: stop without retrying (exit 75).
        case stop
    }

    public enum State: Sendable, Equatable {
        case idle
        /// `attempt` counts the tries since the deadline was set; `delay` is the next wait.
        case connecting(attempt: Int, deadline: ContinuousClock.Instant, delay: Duration)
        case awaitingChallenge
        case awaitingJobSpec
        /// The coordinator names each layer in LayerBegin; power requests refer to it by index.
        case serving(JobSpec, layers: [UInt32: GradientLayer])
        /// This side ended the connection (reason for the log); a reconnect follows.
        case closing(reason: String)
        case finished(adapterPath: String)
        case failed(WorkerError)
        case stopped
    }

    public let configuration: Configuration
    /// The layers this worker's files hold.
    public let layers: [GradientLayer]
    public private(set) var state: State = .idle

    public init(configuration: Configuration, layers: [GradientLayer]) {
        self.configuration = configuration
        self.layers = layers
    }

    private var isOver: Bool {
        switch state {
        case .finished, .failed, .stopped: true
        default: false
        }
    }

    // MARK: - Connecting

    public mutating func start(now: ContinuousClock.Instant) -> [Action] {
        guard case .idle = state else { return [] }
        state = .connecting(attempt: 1, deadline: now + configuration.connectTimeout, delay: configuration.firstRetryDelay)
        return [.connect]
    }

    public mutating func connectFailed(_ failure: ConnectionFailure, now: ContinuousClock.Instant) -> [Action] {
        guard case .connecting(let attempt, let deadline, let delay) = state else { return [] }
        if failure.isTLS { return fail(tlsFailure(failure)) }
        guard now < deadline else {
            // Resumable: the coordinator may come back (a restart resumes the job).
            return fail(WorkerError(message: "could not reach the coordinator at \(configuration.coordinator) within \(configuration.connectTimeout): \(failure.description)",
                                    isFinal: true, kind: .interrupted))
        }
        state = .connecting(attempt: attempt + 1, deadline: deadline, delay: Swift.min(delay * 2, configuration.maxRetryDelay))
        return [.retry(after: delay, because: "coordinator at \(configuration.coordinator) not reachable (\(failure.description))")]
    }

    /// A connection is open (the backoff starts over); the coordinator speaks first.
    public mutating func connected() -> [Action] {
        guard case .connecting = state else { return [] }
        state = .awaitingChallenge
        return []
    }

    /// The connection ended: by the peer or this side (`failure` nil) or by an error.
    public mutating func connectionClosed(now: ContinuousClock.Instant, failure: ConnectionFailure? = nil) -> [Action] {
        if isOver { return [] }
        if let failure, failure.isTLS { return fail(tlsFailure(failure)) }
        let reason: String
        if let failure {
            reason = "connection to the coordinator failed (\(failure.description))"
        } else if case .closing(let why) = state {
            reason = why
        } else {
            reason = "connection to the coordinator lost"
        }
        state = .connecting(attempt: 1, deadline: now + configuration.connectTimeout, delay: configuration.firstRetryDelay)
        return [.reconnect(because: reason)]
    }

    /// A termination signal: stop, never retry.
    public mutating func cancelled() -> [Action] {
        if isOver { return [] }
        state = .stopped
        return [.stop]
    }

    // MARK: - Messages

    public mutating func received(_ message: WireMessage) -> [Action] {
        switch state {
        case .awaitingChallenge: challengeStage(message)
        case .awaitingJobSpec: jobSpecStage(message)
        case .serving(let spec, var layerByIndex):
            serving(message, spec: spec, layers: &layerByIndex)
        case .idle, .connecting, .closing, .finished, .failed, .stopped: []
        }
    }

    private mutating func challengeStage(_ message: WireMessage) -> [Action] {
        switch message {
        case .challenge(let challenge):
            state = .awaitingJobSpec
            return [.sendHello(challenge: challenge, sessionNonce: configuration.sessionNonce)]
        case .error(let error):
            // Refused before the handshake (e.g. a TLS coordinator answering a plaintext worker).
            return fail(WorkerError(message: "the coordinator at \(configuration.coordinator) refused the connection: \(error.message)", isFinal: true, kind: error.code.failureKind))
        default:
            return fail(WorkerError(message: "the peer at \(configuration.coordinator) is not a lora-ga coordinator (it opened with \(message.type))", isFinal: true))
        }
    }

    private mutating func jobSpecStage(_ message: WireMessage) -> [Action] {
        switch message {
        case .jobSpec(let spec):
            state = .serving(spec, layers: [:])
            return [.sendAnnounce(spec)]
        case .error(let error):
            return fail(WorkerError(message: "the coordinator refused worker '\(configuration.workerID)': \(error.message)", isFinal: true, kind: error.code.failureKind))
        default:
            return fail(WorkerError(message: "expected JobSpec, got \(message.type)", isFinal: true))
        }
    }

    private mutating func serving(_ message: WireMessage, spec: JobSpec, layers layerByIndex: inout [UInt32: GradientLayer]) -> [Action] {
        var actions: [Action] = []
        switch message {
        case .layerBegin(let begin):
            guard let layer = layers.first(where: { $0.name == begin.name }) else {
                return fail(WorkerError(message: "the coordinator asked for layer '\(begin.name)', which this worker's files do not hold", isFinal: true))
            }
            layerByIndex[begin.layerIndex] = layer
            if spec.mode != .power {
                // Streamed once; a restarted layer gets a new reader.
                actions = [.streamLayer(begin, layer, spec), .releaseLayer(layer)]
            }
        case .powerRequest(let request):
            guard let layer = layerByIndex[request.layerIndex] else {
                return fail(WorkerError(message: "power request for layer \(request.layerIndex) before its LayerBegin", isFinal: true))
            }
            actions = [.answerPower(request, layer)]
        case .layerDone(let done):
            if let layer = layerByIndex.removeValue(forKey: done.layerIndex) { actions = [.releaseLayer(layer)] }
        case .jobDone(let done):
            state = .finished(adapterPath: done.adapterPath)
            return [.finish(done)]
        case .error(let error):
            let failure = WorkerError(message: "coordinator: \(error.message)", isFinal: error.code != .badData, kind: error.code.failureKind)
            guard failure.isFinal else {
                state = .closing(reason: "connection to the coordinator failed (\(failure))")
                return [.closeConnection]
            }
            return fail(failure)
        case .goodbye(let goodbye):
            state = .closing(reason: "the coordinator said goodbye (\(goodbye.reason))")
            return [.closeConnection]
        case .challenge, .jobSpec, .hello, .announce, .shard, .layerCommit, .powerReply:
            return fail(WorkerError(message: "unexpected \(message.type) from the coordinator", isFinal: true))
        }
        state = .serving(spec, layers: layerByIndex)
        return actions
    }

    // MARK: - Failures

    /// Reading this worker's files failed (unreadable, or NaN/Inf): no correct adapter can come
    /// of the job. Say so to the coordinator, and stop.
    public mutating func filesFailed(_ message: String) -> [Action] {
        if isOver { return [] }
        return [.sendError(ErrorMessage(code: .badData, message: message))] + fail(WorkerError(message: message, isFinal: true, kind: .badInput))
    }

    private mutating func fail(_ error: WorkerError) -> [Action] {
        state = .failed(error)
        return [.fail(error)]
    }

    /// A TLS handshake that failed: a plaintext coordinator, or a certificate the CA did not
    /// sign. Retrying cannot help; the configuration must change.
    private func tlsFailure(_ failure: ConnectionFailure) -> WorkerError {
        WorkerError(message: "TLS with the coordinator at \(configuration.coordinator) failed (\(failure.description)): does it serve TLS (--tls-cert/--tls-key), signed by the CA in --tls-ca? A coordinator without --tls-cert speaks plaintext: then drop --tls-ca",
                    isFinal: true, kind: .usage)
    }
}
