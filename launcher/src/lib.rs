//! The geoml launcher: `geoml run`, `compare`, `benchmark`, `bench` and
//! `cartel-bench` — a job's roles started as real processes on this
//! machine, the emulated WAN between its datacenters, and the reports.
//!
//! Depends on the data plane (`geoml-dataplane`) for what the roles are;
//! the data plane never depends on this crate.

pub mod bench;
pub mod benchmark;
pub mod cartel;
pub mod compare;
pub mod error;
pub mod options;
pub mod process;
pub mod report;
pub mod run;
pub mod wan;
