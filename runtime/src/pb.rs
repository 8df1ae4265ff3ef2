//! Generated gRPC and protobuf types (`proto/ps.proto`).

#![allow(missing_docs, clippy::pedantic)] // generated code

tonic::include_proto!("geoml.ps.v1");
