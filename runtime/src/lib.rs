//! The geoml data plane: data sets, models, parameter servers, workers and
//! the local runner behind the `geoml` CLI.

pub mod bench;
pub mod cartel;
pub mod compare;
pub mod data;
pub mod gaia;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod pb;
pub mod placement;
pub mod ps;
pub mod run;
pub mod wan;
pub mod worker;
