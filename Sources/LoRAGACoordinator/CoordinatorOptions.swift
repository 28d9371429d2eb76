import Foundation
import LoRAGACore
import LoRAGADaemon
import LoRAGAFormats
import LoRAGAWire

/// How a coordinator runs a job.
public struct CoordinatorOptions: Sendable {
    public var settings: JobSettings
    public var expectedWorkers: Int
    public var outputDirectory: String
    /// Layers open at once.
    public var window: Int = 2
    /// dtype shards travel in.
    public var payloadDType: TensorDType = .f32
    /// zstd over byte-shuffled shards (pays off on slow networks, not on loopback).
    public var compressShards = false
    public var adapterDType: TensorDType = .f32
    /// How long to wait for all workers to announce before giving up.
    public var gatherTimeout: Duration = .seconds(600)
    /// How long a worker that left mid-job may take to come back.
    public var rejoinTimeout: Duration = .seconds(120)
    /// Discard an existing job in the output directory.
    public var restart = false
    /// Entries of a layer that no worker's blocks cover count as zeros instead of failing the job.
    public var allowUncovered = false
    /// When set, every worker must prove it knows this secret before it can send anything.
    public var secret: JobSecret?
    /// Prometheus metrics and the progress estimate of the per-layer log lines.
    public var metrics = CoordinatorMetrics()
    /// How long a new connection may take to greet and announce before it is closed.
    public var handshakeTimeout: Duration = .seconds(10)
    /// Connections that have not finished the handshake, at most; more are refused at once.
    public var maxPendingConnections = 64
    /// A worker that owes an open layer data and has sent nothing for this long is named in a
    /// warning (once per silence) with what it still owes.
    public var stallWarning: Duration = .seconds(60)

    public init(settings: JobSettings, expectedWorkers: Int, outputDirectory: String) {
        self.settings = settings
        self.expectedWorkers = expectedWorkers
        self.outputDirectory = outputDirectory
    }
}

/// What a finished job reports.
public struct CoordinatorSummary: Sendable {
    public var layers: Int
    public var bytesReceived: Int
    public var seconds: Double
    /// Dense and sketch: time during which some layer's shards were arriving (the union over
    /// layers, from a layer's first shard to its last commit), the denominator of ingest.
    public var receivingSeconds: Double?
    public var worstFidelityEstimate: Double?
    public var adapterDirectory: String
}

/// Messages for one connection's writer: a frame to send, or "finish and close".
public enum Outgoing: Sendable {
    case message(WireMessage)
    case close
}

