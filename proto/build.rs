//! Compiles the gRPC definitions in this directory with a vendored `protoc`,
//! so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Row payloads decode as `bytes::Bytes`: a slice of the received buffer,
    // not a copy, and a cheap clone for the write-ahead log.
    config.bytes([".geoml.ps.v1.Rows"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["ps.proto", "mirror.proto"],
        &["."],
    )?;
    // Cartel's registry and model exchange.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &["registry.proto"], &["."])?;
    for proto in ["ps.proto", "mirror.proto", "registry.proto"] {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
