//! Generates the conveyor.v1 message types and gRPC stubs with a vendored protoc, so a fresh
//! machine needs no system protobuf compiler.
//!
//! Two passes: the messages with the client and the plain server (`conveyor.v1.rs`), then a second
//! server (`server/conveyor.v1.rs`) identical except that `StreamBatches` answers with
//! [`OutgoingBatch`](crate::wire::OutgoingBatch), which writes the same wire bytes but gathers a
//! batch's rows straight into the buffer that goes to the socket.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    // `.bytes(".")`: `bytes` fields decode as `bytes::Bytes`, a slice of the received buffer
    // rather than a second copy of every batch.
    tonic_prost_build::configure().bytes(".").compile_with_config(config, &["proto/conveyor.proto"], &["proto"])?;

    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::wire::GatherCodec")
        .out_dir(&server_dir)
        // Every message is the one generated above, except the batch stream's response.
        .extern_path(".conveyor.v1", "crate::v1")
        .extern_path(".conveyor.v1.BatchResponse", "crate::wire::OutgoingBatch")
        .compile_with_config(config, &["proto/conveyor.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/conveyor.proto");
    Ok(())
}
