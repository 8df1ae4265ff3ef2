//! The geoml data plane: data sets, models, parameter-server shards, Gaia's
//! mirror sync, workers and Cartel's sites and registry — everything a role
//! process runs once it knows its place.
//!
//! The launcher (`geoml-launcher`) starts these roles as processes; this
//! crate never depends on it, so nothing here can reach into a local run.

pub mod cartel;
pub mod data;
pub mod gaia;
pub mod metrics;
pub mod model;
pub mod placement;
pub mod ps;
mod retry;
pub mod state;
pub mod tls;
pub mod worker;

pub use geoml_crds::manifest;
pub use geoml_proto as pb;
