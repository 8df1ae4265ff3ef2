//! [`RunError`]: what can go wrong running a job locally, one variant per
//! cause, each keeping its source.

use std::time::Duration;

use geoml_crds::manifest::ManifestError;
use geoml_dataplane::cartel::CartelError;
use geoml_dataplane::data::DataError;
use geoml_dataplane::model::ModelError;

use crate::process::ProcessError;

/// What can go wrong running a job locally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A manifest could not be rewritten (`geoml compare`'s per-mode copies).
    #[error("manifest: {0}")]
    Yaml(#[from] geoml_crds::yaml::SerializeError),
    /// A manifest holds a SyncPolicy without a spec.
    #[error("manifest: a SyncPolicy has no spec")]
    SyncPolicyWithoutSpec,
    /// The job's data set could not be loaded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The job's model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A Collaborative job failed.
    #[error(transparent)]
    Cartel(#[from] CartelError),
    /// A WAN fault names something the run's WAN does not have.
    #[error(transparent)]
    Fault(#[from] crate::wan::fault::FaultError),
    /// The job asks for something local runs do not support.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A role process could not be started, failed or did not stop.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("{what} did not {happen} within {} s", .after.as_secs())]
    Timeout {
        /// The role or roles.
        what: String,
        /// What they should have done (`start`, `finish`, ...).
        happen: &'static str,
        /// How long they had.
        after: Duration,
    },
    /// A parameter server did not answer.
    #[error("parameter server {shard}: {message}")]
    Unreachable {
        /// The shard.
        shard: usize,
        /// Why.
        message: String,
    },
    /// The final model could not be read from its parameter servers.
    #[error("reading the final model: {0}")]
    FinalModel(#[from] geoml_dataplane::worker::WorkerError),
    /// A site's report is not what `geoml site --report` writes.
    #[error("{}: {source}", .path.display())]
    SiteReport {
        /// The report file.
        path: std::path::PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// The plot could not be drawn.
    #[error("drawing the plot: {0}")]
    Plot(#[from] plotters::drawing::DrawingAreaErrorKind<std::io::Error>),
    /// The report could not be written.
    #[error("writing the report: {0}")]
    Report(#[from] serde_json::Error),
}

/// `RunError::Io` while doing `context`.
pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let context = context.into();
    move |source| RunError::Io { context, source }
}
