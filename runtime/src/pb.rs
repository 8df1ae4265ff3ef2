//! Generated gRPC and protobuf types (`proto/ps.proto`, `proto/mirror.proto`).

#![allow(missing_docs, clippy::pedantic)] // generated code

tonic::include_proto!("geoml.ps.v1");

/// The mirror protocol between datacenters (`proto/mirror.proto`).
pub mod mirror {
    tonic::include_proto!("geoml.mirror.v1");
}
