//! Generated gRPC and protobuf types of Cartel (`proto/registry.proto`).

#![allow(missing_docs, clippy::pedantic)] // generated code

tonic::include_proto!("geoml.cartel.v1");
