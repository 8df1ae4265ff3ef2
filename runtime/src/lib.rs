//! The geoml data plane: data sets, models, parameter servers, workers and
//! the local runner behind the `geoml` CLI.

pub mod bench;
pub mod cartel;
pub mod data;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod pb;
pub mod ps;
pub mod run;
pub mod worker;
