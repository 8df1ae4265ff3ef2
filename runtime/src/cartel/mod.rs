//! Cartel collaborative learning (SoCC 2019): small per-site models that,
//! when their data drifts, borrow portions of the models of logically
//! neighbouring sites found through a metadata registry — and the baselines
//! it is measured against (isolated, centralized, one global model).
//!
//! - [`divergence`]: Jensen–Shannon divergence and the choice of neighbours.
//! - [`drift`]: the drift detectors (window W / limit L, ADWIN).
//! - [`model`]: the online linear model with per-class weight blocks.
//! - [`registry`]: `geoml registry`, the persisted metadata service.
//! - [`site`]: a site's learning loop and model exchange (`geoml site`).
//! - [`scenario`]: what each site sees (class swap, nycflights13).
//! - [`baselines`]: centralized and global, run in one process.
//! - [`harness`]: [`run`] — a job's sites and registry as real processes,
//!   and the report with adaptation, bytes, model size and training time.

pub mod baselines;
pub mod cli;
pub mod divergence;
pub mod drift;
pub mod harness;
pub mod model;
pub mod pb;
pub mod registry;
pub mod scenario;
pub mod site;

use geoml_crds::sync_policy::Collaborative;
use geoml_crds::training_job::{ModelKind, TrainingJobSpec};
use serde::Serialize;

pub use harness::{CartelSummary, run, run_detailed};

/// What can go wrong in collaborative learning.
#[derive(Debug, thiserror::Error)]
pub enum CartelError {
    /// The job asks for something this mode cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// The manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    /// The data set could not be loaded.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A gRPC peer failed or sent something unusable.
    #[error("{0}")]
    Protocol(String),
    /// A process failed; carries the end of its log.
    #[error("{role} exited with {status}; last log lines:\n{log}")]
    Failed {
        /// `cartel-registry`, `cartel-site-ewr`, ...
        role: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its log.
        log: String,
    },
}

impl CartelError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CartelError {
        let context = context.into();
        move |source| CartelError::Io { context, source }
    }
}

/// What a Collaborative run adds to a `geoml run` report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CollaborativeTotals {
    /// Mean over drift events of the batches until accuracy is back within
    /// 2 points of its pre-drift level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptation_batches: Option<f64>,
    /// Model bytes per site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_bytes: Option<u64>,
    /// Seconds spent training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_seconds: Option<f64>,
}

/// `geoml run` (and `geoml compare`) of a job that [`Mode::of_job`] gives a mode.
pub async fn run_job(
    options: &crate::run::RunOptions,
    mode: Mode,
) -> Result<crate::run::Report, crate::run::RunError> {
    run(options, mode)
        .await
        .map_err(|e| crate::run::RunError::Unsupported(e.to_string()))
}

/// How the sites of a Collaborative job learn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Mode {
    /// Cartel: per-site models that borrow from logical neighbours on drift.
    Cartel,
    /// Every site learns alone.
    Isolated,
    /// Every site ships its raw data to one place, which trains one model and ships it back.
    Centralized,
    /// One global model: every site trains a copy and all copies are
    /// averaged every `metadataIntervalBatches` batches.
    Global,
}

impl Mode {
    /// The name reports use.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Mode::Cartel => "cartel",
            Mode::Isolated => "isolated",
            Mode::Centralized => "centralized",
            Mode::Global => "global",
        }
    }

    /// The mode this module runs `job` in, if any: every Collaborative job
    /// (as `cartel`), and jobs of the small per-site models (`OnlineLinear`,
    /// `OnlineForest`) with the baselines' inter-datacenter models —
    /// `Isolated`, `Centralized`, and `FedAvg` as `global` — which is how
    /// `geoml compare --modes cartel,isolated,centralized` runs a
    /// Collaborative job's baselines.
    #[must_use]
    pub fn of_job(job: &crate::manifest::ResolvedJob<'_>) -> Option<Mode> {
        use geoml_crds::sync_policy::InterDatacenterModel as Inter;
        let small = matches!(
            job.job.spec.model.kind,
            ModelKind::OnlineLinear | ModelKind::OnlineForest
        );
        match job.sync_policy.spec.inter_datacenter.model {
            Inter::Collaborative => Some(Mode::Cartel),
            Inter::Isolated if small => Some(Mode::Isolated),
            Inter::Centralized if small => Some(Mode::Centralized),
            Inter::FedAvg if small => Some(Mode::Global),
            _ => None,
        }
    }

    /// The mode called `name` (`cartel`, `isolated`, `centralized`, `global`).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Mode> {
        [
            Mode::Cartel,
            Mode::Isolated,
            Mode::Centralized,
            Mode::Global,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }
}

/// A site's checked settings, from the job and its SyncPolicy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiteConfig {
    /// Drift window W, in batches.
    pub window: usize,
    /// Drift limit L on the windowed error rate.
    pub limit: f64,
    /// Neighbours k to borrow from.
    pub neighbours: usize,
    /// Refresh metadata every m batches.
    pub metadata_interval: usize,
    /// ... or when the priors move by more than this total variation.
    pub metadata_change: f64,
    /// SGD step of the online model.
    pub learning_rate: f32,
    /// L2 regularisation.
    pub l2: f32,
    /// Use ADWIN instead of the window/limit detector.
    pub adwin: bool,
}

impl SiteConfig {
    /// The settings of a job; only `OnlineLinear` models are supported.
    pub fn from_job(spec: &TrainingJobSpec, policy: &Collaborative) -> Result<Self, CartelError> {
        if spec.model.kind != ModelKind::OnlineLinear {
            return Err(CartelError::Unsupported(format!(
                "model {:?} in the Collaborative mode: only OnlineLinear (per-class weight blocks) is implemented",
                spec.model.kind
            )));
        }
        let positive = |v: i32| usize::try_from(v).unwrap_or(1).max(1);
        #[allow(clippy::cast_possible_truncation)] // learning rates and L2 are small
        Ok(Self {
            window: positive(policy.drift_window),
            limit: policy.drift_limit,
            neighbours: positive(policy.neighbours),
            metadata_interval: positive(policy.metadata_interval_batches),
            metadata_change: policy.metadata_change_threshold,
            learning_rate: spec.model.learning_rate as f32,
            l2: spec.model.l2 as f32,
            adwin: false,
        })
    }
}
