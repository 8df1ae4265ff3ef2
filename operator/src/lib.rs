//! geoml's Kubernetes operator: turns TrainingJobs into parameter servers and
//! workers in every datacenter they name, wired across clusters.
//!
//! Two controllers share one [`Context`]:
//! - [`datacenter`] connects to each Datacenter's cluster (the local one, or a
//!   remote one through a kubeconfig Secret), keeps its `Active` condition and
//!   caches the operator's pods there;
//! - [`job`] reconciles each TrainingJob as a pipeline — dereference,
//!   validate, build (pure), server-side apply, status — in every datacenter.
//!
//! SyncPolicies have no controller of their own: the TrainingJob controller
//! watches them and rewrites the topology ConfigMaps of the jobs that use a
//! policy when it changes, without touching their pods.

pub mod clusters;
pub mod conditions;
pub mod datacenter;
pub mod job;
pub mod leader;
pub mod metrics;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

pub use clusters::Clusters;
pub use metrics::Metrics;

/// What can go wrong in a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error("{context}: {source}")]
    Kube {
        /// What was being done.
        context: String,
        /// The apiserver's or the client's error.
        source: kube::Error,
    },
    /// Serialising the manifest or topology failed.
    #[error("serialising YAML: {0}")]
    Yaml(#[from] geoml_crds::yaml::SerializeError),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The job's CA or a role certificate could not be made or read.
    #[error("certificates: {0}")]
    Pki(#[from] geoml_crds::pki::PkiError),
    /// A datacenter whose objects must be deleted cannot be reached.
    #[error("cannot clean up in datacenter {datacenter}: {reason}")]
    CleanupBlocked {
        /// The Datacenter.
        datacenter: String,
        /// Why it cannot be reached.
        reason: String,
    },
}

impl Error {
    /// A short label for the `error` label of the failure metric.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::Yaml(_) => "yaml",
            Self::Pki(_) => "pki",
            Self::Finalizer(_) => "finalizer",
            Self::CleanupBlocked { .. } => "cleanup_blocked",
        }
    }

    /// Wraps a client error with what was being done.
    pub fn kube(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let context = context.into();
        move |source| Self::Kube { context, source }
    }
}

/// Settings of one operator instance.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image of the pods of jobs that do not name one.
    pub default_image: String,
    /// The operator's own namespace, the only one whose Secrets it reads: a
    /// remote Datacenter's kubeconfig Secret must be there.
    pub namespace: String,
    /// How often an active Datacenter's cluster is probed.
    pub probe_interval: Duration,
    /// Longest wait between retries of a failing reconciliation or an
    /// unreachable cluster (the wait doubles from one second up to this).
    pub max_backoff: Duration,
    /// How often a running job's progress is read from its parameter servers.
    pub progress_interval: Duration,
}

/// What both controllers share.
pub struct Context {
    /// Client of the cluster the operator runs in (the hub).
    pub client: Client,
    /// Connections to the Datacenters' clusters.
    pub clusters: Clusters,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Publishes Kubernetes events on the hub.
    pub recorder: Recorder,
    /// Settings.
    pub settings: Settings,
    /// Wakes the TrainingJob controller when a pod of a job changes in any cluster.
    pub wake: mpsc::UnboundedSender<kube::runtime::reflector::ObjectRef<geoml_crds::TrainingJob>>,
    /// The backoff of each object that is failing.
    failures: Mutex<std::collections::HashMap<String, ExponentialBackoff>>,
}

impl Context {
    /// Backoff before retrying object `key` after one more failure: 1 s,
    /// 2 s, 4 s, … up to `max_backoff`.
    pub fn backoff(&self, key: &str) -> Duration {
        let max = self.settings.max_backoff;
        let Ok(mut failures) = self.failures.lock() else {
            return max;
        };
        failures
            .entry(key.to_owned())
            .or_insert_with(|| {
                ExponentialBuilder::new()
                    .with_min_delay(Duration::from_secs(1).min(max))
                    .with_max_delay(max)
                    .without_max_times()
                    .build()
            })
            .next()
            .unwrap_or(max)
    }

    /// Publishes an event about `object`; failing to is logged, not an error.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, object).await {
            tracing::warn!(%error, "publishing an event");
        }
    }

    /// Forgets the failures of object `key` after it succeeded.
    pub fn reset_backoff(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

/// The operator: both controllers over one hub client.
pub struct Operator {
    context: Arc<Context>,
    wakeups: mpsc::UnboundedReceiver<kube::runtime::reflector::ObjectRef<geoml_crds::TrainingJob>>,
}

impl Operator {
    /// An operator that reconciles through `client`.
    pub fn new(client: Client, settings: Settings) -> Result<Self, prometheus::Error> {
        let (wake, wakeups) = mpsc::unbounded();
        let reporter = Reporter {
            controller: job::build::MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let context = Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            clusters: Clusters::default(),
            metrics: Metrics::new()?,
            settings,
            wake,
            failures: Mutex::default(),
        });
        Ok(Self { context, wakeups })
    }

    /// The operator's metrics.
    #[must_use]
    pub fn metrics(&self) -> Metrics {
        self.context.metrics.clone()
    }

    /// Runs both controllers until `shutdown` completes; reconciliations in
    /// flight finish first.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let datacenters = datacenter::run(self.context.clone(), signal(stopped.clone()));
        let jobs = job::run(self.context.clone(), self.wakeups, signal(stopped));
        let trigger = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        tokio::join!(datacenters, jobs, trigger);
    }
}
