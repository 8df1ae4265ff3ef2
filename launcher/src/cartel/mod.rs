//! Collaborative jobs run locally: the harness that starts a job's sites and
//! registry as processes ([`harness`]), the in-process baselines
//! ([`baselines`]) and `geoml cartel-bench` ([`cli`]).

pub mod baselines;
pub mod cli;
pub mod harness;

pub use harness::{CartelSummary, run, run_detailed};
