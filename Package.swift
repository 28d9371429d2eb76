// swift-tools-version:6.0
import PackageDescription

// Dependencies point downward only (Sources/LoRAGACoordinator/LoRAGACoordinator.docc/Architecture.md):
// executables → LoRAGACoordinator / LoRAGAWorker → LoRAGAWire, LoRAGAFormats → LoRAGACore → C modules.
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
        .target(name: "LoRAGACore", dependencies: ["COpenBLAS", "CMalloc", "CPrefetch"]),
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
            name: "LoRAGACoordinator",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGAWire",
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
                "LoRAGACore", "LoRAGAFormats", "LoRAGAWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "LoraGACLI",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGACoordinator", "LoRAGAWorker",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "LoraGACoord",
            dependencies: [
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                "LoRAGACoordinator", "LoRAGAFormats", "LoRAGAWire",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "LoraGAWorkerMain",
            dependencies: [
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                "LoRAGAWorker", "LoRAGACoordinator", "LoRAGAFormats", "LoRAGAWire",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Scripts/bench's machine measurements; not a product (users never need it).
        .executableTarget(
            name: "lora-ga-bench",
            dependencies: [
                "LoRAGACore", "COpenBLAS",
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
            dependencies: ["LoRAGACoordinator", "LoRAGAWire", "LoRAGAFormats", "LoRAGACore"]
        ),
        .testTarget(
            name: "LoRAGASystemTests",
            dependencies: [
                "LoRAGACore", "LoRAGAFormats", "LoRAGACoordinator", "LoRAGAWorker", "LoRAGAWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["Fixtures"]
        ),
    ]
)
