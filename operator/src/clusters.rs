//! Connections to the clusters Datacenters name: a client, whether the
//! cluster answers, and a cache of the operator's pods there whose changes
//! wake the TrainingJobs they belong to.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use geoml_crds::TrainingJob;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;

use crate::job::build::{JOB_LABEL, JOB_NAMESPACE_LABEL, MANAGED_BY, MANAGER};

/// Why a datacenter's cluster cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// A `PascalCase` reason: `KubeconfigSecretMissing`, `Unreachable`, …
    pub reason: String,
    /// What went wrong, for people.
    pub message: String,
}

/// A connected cluster: its client and the operator's pods there.
#[derive(Clone)]
pub struct Cluster {
    /// A client for the cluster.
    pub client: Client,
    /// The pods the operator created there (label `app.kubernetes.io/managed-by`).
    pub pods: Store<Pod>,
    /// Whether the last probe succeeded.
    pub available: Result<(), Unavailable>,
    /// Identifies the credentials the client was built from; a change
    /// replaces the connection.
    pub fingerprint: String,
    // Held so that the pod watch stops when the last clone goes.
    _watch: Arc<AbortOnDrop>,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The clusters of every Datacenter, by Datacenter name. The Datacenter
/// controller fills it in; the TrainingJob controller reads it.
#[derive(Clone, Default)]
pub struct Clusters {
    inner: Arc<RwLock<HashMap<String, Result<Cluster, Unavailable>>>>,
}

impl Clusters {
    /// The cluster of Datacenter `name`, or why there is none (None when the
    /// Datacenter controller has not seen it yet).
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Result<Cluster, Unavailable>> {
        self.inner.read().ok()?.get(name).cloned()
    }

    /// Records the state of Datacenter `name`.
    pub fn set(&self, name: &str, state: Result<Cluster, Unavailable>) {
        if let Ok(mut map) = self.inner.write() {
            map.insert(name.to_owned(), state);
        }
    }

    /// Forgets every Datacenter for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut map) = self.inner.write() {
            map.retain(|name, _| keep(name));
        }
    }
}

impl Cluster {
    /// Connects to a cluster: starts caching the operator's pods there and
    /// sends a reference to a pod's TrainingJob to `wake` whenever the pod
    /// changes. The watch retries with backoff while the cluster is down.
    #[must_use]
    pub fn connect(
        client: Client,
        fingerprint: String,
        wake: UnboundedSender<ObjectRef<TrainingJob>>,
    ) -> Self {
        let (pods, writer) = reflector::store();
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGER}"));
        let stream = watcher(Api::<Pod>::all(client.clone()), config)
            .default_backoff()
            .reflect(writer);
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // Jobs with pods here: after a re-list (the watch broke, for
            // example while the apiserver was down) they are all woken,
            // since pods deleted meanwhile produce no event of their own.
            let mut seen = HashSet::new();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::Delete(pod)) => {
                        if let Some(job) = job_of(&pod) {
                            seen.insert(job.clone());
                            let _ = wake.unbounded_send(job);
                        }
                    }
                    Ok(watcher::Event::InitApply(pod)) => seen.extend(job_of(&pod)),
                    Ok(watcher::Event::InitDone) => {
                        for job in &seen {
                            let _ = wake.unbounded_send(job.clone());
                        }
                    }
                    Ok(watcher::Event::Init) => {}
                    Err(error) => tracing::debug!(%error, "watching pods"),
                }
            }
        });
        Self {
            client,
            pods,
            available: Ok(()),
            fingerprint,
            _watch: Arc::new(AbortOnDrop(task)),
        }
    }

    /// The cached pods of one job in one of its datacenters.
    #[must_use]
    pub fn datacenter_pods(&self, job: &TrainingJob, datacenter: &str) -> Vec<Arc<Pod>> {
        self.job_pods(job)
            .into_iter()
            .filter(|pod| {
                pod.labels()
                    .get(crate::job::build::DATACENTER_LABEL)
                    .map(String::as_str)
                    == Some(datacenter)
            })
            .collect()
    }

    /// The cached pods of one job.
    #[must_use]
    pub fn job_pods(&self, job: &TrainingJob) -> Vec<Arc<Pod>> {
        let name = job.name_any();
        let namespace = job.namespace().unwrap_or_default();
        self.pods
            .state()
            .into_iter()
            .filter(|pod| {
                let labels = pod.labels();
                labels.get(JOB_LABEL) == Some(&name)
                    && labels.get(JOB_NAMESPACE_LABEL) == Some(&namespace)
            })
            .collect()
    }
}

/// The TrainingJob a pod belongs to, from its labels.
fn job_of(pod: &Pod) -> Option<ObjectRef<TrainingJob>> {
    let labels = pod.labels();
    let name = labels.get(JOB_LABEL)?;
    let namespace = labels.get(JOB_NAMESPACE_LABEL)?;
    Some(ObjectRef::new(name).within(namespace))
}
