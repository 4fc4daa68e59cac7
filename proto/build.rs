//! Generates the conveyor.v1 message types and gRPC stubs with a vendored protoc, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // `.bytes(".")`: `bytes` fields decode as `bytes::Bytes`, a slice of the received buffer
    // rather than a second copy of every batch.
    tonic_prost_build::configure().bytes(".").compile_with_config(config, &["proto/conveyor.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/conveyor.proto");
    Ok(())
}
