//! [`RunOptions`]: how to run a job locally, shared by `geoml run`,
//! `geoml compare`, the Cartel harness and `geoml cartel-bench`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::wan::fault::ScheduledFault;

/// How to run a job locally.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The `geoml` binary to start roles with.
    pub geoml: PathBuf,
    /// The manifest file.
    pub manifest: PathBuf,
    /// Where logs, topology files and checkpoints go.
    pub work_dir: PathBuf,
    /// Where data sets are cached.
    pub data_dir: PathBuf,
    /// Evaluate every this many clocks.
    pub eval_every: u64,
    /// Draw progress bars.
    pub progress: bool,
    /// The target time to target is measured against, when the manifest's
    /// job has none of its own (`geoml compare --full-budget` removes it so
    /// that runs use their whole clock budget).
    pub target: Option<f64>,
    /// Where the WAN proxy serves its fault API [default: a free loopback
    /// port]; `geoml run` prints it when progress is drawn.
    pub wan_control: Option<SocketAddr>,
    /// Faults the launcher applies to the WAN during the run (`geoml run
    /// --fault`); refused when the run has no WAN between datacenters.
    pub faults: Vec<ScheduledFault>,
    /// Seed of the initial model, the data order and the partitions
    /// (every role's `--seed`).
    pub seed: u64,
    /// Run the roles without TLS (`--insecure-plaintext`); by default a
    /// throwaway CA gives every role a certificate and they use mTLS.
    pub insecure_plaintext: bool,
}
