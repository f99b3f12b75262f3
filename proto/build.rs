//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler), so no system `protoc`
//! is needed. The messages are always generated (prost); the gRPC clients and servers only with
//! the `grpc` feature (tonic-prost-build, which generates the same messages plus the services).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/link.proto", "proto/fibre.proto", "proto/kme.proto", "proto/device.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    #[cfg(feature = "grpc")]
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    #[cfg(not(feature = "grpc"))]
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
