//! The geoml data plane. For now: reading the manifests users apply, so that
//! `geoml run` can execute the same YAML locally.

pub mod manifest;
