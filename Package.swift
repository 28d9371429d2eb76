// swift-tools-version:6.0
import PackageDescription

// Dependencies point downward only (Sources/LoRAGACoordinator/LoRAGACoordinator.docc/Architecture.md):
// executables → LoRAGACoordinator / LoRAGAWorker → LoRAGADaemon (settings, lifecycle, logging,
// exit codes, metrics, TLS) → LoRAGAWire, LoRAGAFormats → LoRAGACore → C modules.
let package = Package(
    name: "lora-ga",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "lora-ga", targets: ["LoraGACLI"]),
        .executable(name: "lora-ga-coord", targets: ["LoraGACoord"]),
        .executable(name: "lora-ga-worker", targets: ["LoraGAWorkerMain"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
    ],
    targets: [
        .systemLibrary(
            name: "COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),
        .systemLibrary(
            name: "CZstd",
            pkgConfig: "libzstd",
            providers: [.apt(["libzstd-dev"])]
        ),
        .systemLibrary(name: "CMalloc"),
        .systemLibrary(name: "CPrefetch"),
        .target(name: "LoRAGACore", dependencies: ["COpenBLAS", "CPrefetch"]),
        .target(name: "LoRAGAFormats", dependencies: ["LoRAGACore", "CZstd"]),
        .target(
            name: "LoRAGAWire",
            dependencies: [
                "LoRAGACore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "LoRAGADaemon",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGAWire", "COpenBLAS", "CMalloc",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .target(
            name: "LoRAGACoordinator",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGAWire", "LoRAGADaemon",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "LoRAGAWorker",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGAWire", "LoRAGADaemon",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "LoraGACLI",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGACoordinator", "LoRAGAWorker", "LoRAGADaemon",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "LoraGACoord",
            dependencies: [
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                "LoRAGACoordinator", "LoRAGADaemon", "LoRAGAFormats", "LoRAGAWire",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "LoraGAWorkerMain",
            dependencies: [
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                "LoRAGAWorker", "LoRAGADaemon", "LoRAGAFormats", "LoRAGAWire",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Scripts/bench's machine measurements; not a product (users never need it).
        .executableTarget(
            name: "lora-ga-bench",
            dependencies: [
                "LoRAGACore", "LoRAGADaemon", "LoRAGAFormats", "COpenBLAS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Sources/LoraGABench"
        ),
        .testTarget(name: "LoRAGACoreTests", dependencies: ["LoRAGACore"]),
        .testTarget(name: "LoRAGAFormatsTests", dependencies: ["LoRAGAFormats"]),
        .testTarget(
            name: "LoRAGAWireTests",
            dependencies: [
                "LoRAGAWire", "LoRAGACore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "LoRAGACoordinatorTests",
            dependencies: ["LoRAGACoordinator", "LoRAGADaemon", "LoRAGAWire", "LoRAGAFormats", "LoRAGACore", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "LoRAGAWorkerTests",
            dependencies: ["LoRAGAWorker", "LoRAGADaemon", "LoRAGAWire", "LoRAGAFormats", "LoRAGACore", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "LoRAGASystemTests",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGACoordinator", "LoRAGAWorker", "LoRAGAWire", "LoRAGADaemon",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["Fixtures"]
        ),
    ]
)
