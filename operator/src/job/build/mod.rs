//! Desired objects of one TrainingJob in one datacenter, computed without a cluster.
//!
//! Per datacenter: a headless Service (stable DNS names of the pods), one
//! Service per parameter-server shard (its cluster IP is how the
//! datacenter's workers reach it, so pods need no cluster DNS; with several
//! datacenters it is of the type `peerAccess` names, and how the other
//! datacenters reach it), a ConfigMap with `manifest.yaml` and
//! `topology.yaml`, and the parameter-server and worker pods; in the
//! Collaborative (Cartel) mode instead one site pod and its Service per
//! datacenter, and the registry pod and Service in the job's first one.
//! Every pod has `restartPolicy: Never` and exits 0 when training is done.

use std::collections::BTreeMap;

use geoml_crds::identity;
use geoml_crds::manifest::{Manifest, ManifestError};
use geoml_crds::plan::{JobPlan, PlanError};
use geoml_crds::sync_policy::InterDatacenterModel;
use geoml_crds::training_job::DatacenterPlacement;
use geoml_crds::{Datacenter, SyncPolicy, TrainingJob};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

mod cert_manager;
mod config;
mod pods;
mod services;
#[cfg(test)]
mod tests;
mod tls;

pub use cert_manager::{CERTIFICATE_NAME_ANNOTATION, certificate_ready, certificate_resource};
pub use services::{Endpoints, local_url, peer_url};
pub use tls::{RENEW_AFTER_ANNOTATION, renewal_due, secret_text};

/// Port of a parameter server's gRPC service (workers and mirrors).
pub const PS_PORT: i32 = 7070;
/// Port of every role's Prometheus metrics.
pub const METRICS_PORT: i32 = 9090;
/// Port of the Cartel registry.
pub const REGISTRY_PORT: i32 = 7071;
/// Port of a Cartel site's model exchange.
pub const SITE_PORT: i32 = 7072;
/// Where the topology ConfigMap is mounted (not a parent of the TLS
/// directory, `/etc/geoml/tls`: a volume cannot be mounted inside a
/// ConfigMap's read-only one).
const CONFIG_DIR: &str = "/etc/geoml/job";
/// Where parameter servers write checkpoints.
const CHECKPOINT_DIR: &str = "/var/lib/geoml/checkpoints";
/// Where a parameter server leaves its final progress for the operator
/// (Kubernetes' default `terminationMessagePath`).
const TERMINATION_LOG: &str = "/dev/termination-log";
/// Where the data set's claim is mounted, read-only.
const DATA_DIR: &str = "/var/lib/geoml/data";
/// The user geoml's image runs as (distroless's `nonroot`).
const NONROOT_UID: i64 = 65_532;
/// Where the registry keeps its state.
const REGISTRY_STATE_DIR: &str = "/var/lib/geoml/registry";

/// Label every object the operator creates carries, with value [`MANAGER`].
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The operator's name: value of [`MANAGED_BY`] and its server-side-apply field manager.
pub const MANAGER: &str = "geoml-operator";
/// Label: name of the TrainingJob an object belongs to.
pub const JOB_LABEL: &str = "geoml.io/job";
/// Label: namespace of the TrainingJob an object belongs to (objects in
/// remote clusters cannot carry an owner reference to it).
pub const JOB_NAMESPACE_LABEL: &str = "geoml.io/job-namespace";
/// Label: the Datacenter an object belongs to.
pub const DATACENTER_LABEL: &str = "geoml.io/datacenter";
/// Label: `ps`, `worker` or `registry`.
pub const ROLE_LABEL: &str = "geoml.io/role";
/// Label: shard or worker index within the datacenter.
pub const INDEX_LABEL: &str = "geoml.io/index";
/// Annotation: hash of a pod's spec; a pod whose hash differs from the
/// desired one is replaced (pod specs are immutable).
pub const SPEC_HASH_ANNOTATION: &str = "geoml.io/spec-hash";
/// Annotation: hash of the ConfigMap a pod mounts (the job's manifest and
/// topology). The operator updates it on running pods when the ConfigMap
/// changes: a kubelet refreshes a pod's ConfigMap volumes whenever it syncs
/// the pod, and an annotation change makes it sync at once instead of at
/// its next periodic sync (a minute or more by default).
pub const CONFIG_HASH_ANNOTATION: &str = "geoml.io/config-hash";

/// FNV-1a of `value`'s JSON, as 16 hex digits: stable across operator
/// versions and restarts.
#[must_use]
pub fn content_hash<T: serde::Serialize>(value: &T) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// A role of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A parameter-server shard.
    ParameterServer,
    /// A worker.
    Worker,
    /// A Cartel site (Collaborative mode): one per datacenter.
    Site,
    /// The Cartel registry (Collaborative mode): one, in the first datacenter.
    Registry,
}

impl Role {
    /// Every role.
    pub const ALL: [Self; 4] = [
        Self::ParameterServer,
        Self::Worker,
        Self::Site,
        Self::Registry,
    ];

    /// The role as a certificate names it.
    #[must_use]
    pub fn identity_role(self) -> identity::Role {
        match self {
            Self::ParameterServer => identity::Role::ParameterServer,
            Self::Worker => identity::Role::Worker,
            Self::Site => identity::Role::Site,
            Self::Registry => identity::Role::Registry,
        }
    }

    /// The `geoml` subcommand and label value (the identity's role name).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        self.identity_role().name()
    }
}

/// One datacenter of a job with everything needed to place objects there.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The job's entry for this datacenter (replica counts, resources).
    pub spec: DatacenterPlacement,
    /// The Datacenter object.
    pub datacenter: Datacenter,
    /// Namespace the datacenter's objects go to, in its cluster.
    pub namespace: String,
    /// Node selector of the datacenter's pods.
    pub node_selector: BTreeMap<String, String>,
    /// True when the objects live next to the job (local cluster, same
    /// namespace), so that they can carry an owner reference to it.
    pub owned: bool,
}

impl Placement {
    /// Resolves where a job's objects for `datacenter` go.
    #[must_use]
    pub fn new(job: &TrainingJob, spec: DatacenterPlacement, datacenter: Datacenter) -> Self {
        let job_namespace = job.namespace().unwrap_or_default();
        let cluster = &datacenter.spec.cluster;
        let (namespace, node_selector, local) = match (&cluster.local, &cluster.remote) {
            (_, Some(remote)) => (
                remote.namespace.clone(),
                remote.node_selector.clone(),
                false,
            ),
            (Some(local), None) => (local.namespace.clone(), local.node_selector.clone(), true),
            (None, None) => (None, BTreeMap::new(), true),
        };
        let namespace = namespace.unwrap_or_else(|| job_namespace.clone());
        let owned = local && namespace == job_namespace;
        Self {
            spec,
            datacenter,
            namespace,
            node_selector,
            owned,
        }
    }

    /// Name of the datacenter.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// A job with its SyncPolicy and placements: the input of every builder.
#[derive(Clone, Debug)]
pub struct JobView {
    /// The job.
    pub job: TrainingJob,
    /// Its SyncPolicy.
    pub policy: SyncPolicy,
    /// Its datacenters, in `spec.datacenters` order.
    pub placements: Vec<Placement>,
    /// The job's checked numbers.
    pub plan: JobPlan,
    /// Image of the pods (the job's `spec.image` or the operator's default).
    pub image: String,
}

/// Why a job and the objects it names make no [`JobView`].
#[derive(Debug)]
pub enum ViewError {
    /// The Datacenters not found.
    MissingDatacenters(Vec<String>),
    /// A value of the job or its SyncPolicy is unusable.
    Plan(PlanError),
}

/// Names of the objects of one job in one datacenter.
pub mod names {
    /// The headless Service that gives the pods stable DNS names.
    #[must_use]
    pub fn headless_service(job: &str, dc: &str) -> String {
        format!("{job}-{dc}")
    }
    /// A pod: `<job>-<dc>-ps-<i>` or `<job>-<dc>-worker-<i>`.
    #[must_use]
    pub fn pod(job: &str, dc: &str, role: super::Role, index: i32) -> String {
        format!("{job}-{dc}-{}-{index}", role.as_str())
    }
    /// The Service that exposes shard `index` to other datacenters.
    #[must_use]
    pub fn peer_service(job: &str, dc: &str, index: i32) -> String {
        format!("{job}-{dc}-ps-{index}-peer")
    }
    /// The topology ConfigMap.
    #[must_use]
    pub fn config_map(job: &str, dc: &str) -> String {
        format!("{job}-{dc}-topology")
    }
    /// The registry pod and Service.
    #[must_use]
    pub fn registry(job: &str) -> String {
        format!("{job}-registry")
    }
    /// The Service through which the other sites reach a datacenter's site.
    #[must_use]
    pub fn site_service(job: &str, dc: &str) -> String {
        format!("{job}-{dc}-site")
    }
    /// The Secret holding the job's CA, next to the job.
    #[must_use]
    pub fn ca(job: &str) -> String {
        format!("{job}-ca")
    }
    /// The TLS Secret of `role`'s pods in datacenter `dc`.
    #[must_use]
    pub fn tls(job: &str, dc: &str, role: super::Role) -> String {
        format!("{job}-{dc}-{}-tls", role.as_str())
    }
    /// The claim the operator creates for a datacenter's checkpoints.
    #[must_use]
    pub fn checkpoints(job: &str, dc: &str) -> String {
        format!("{job}-{dc}-checkpoints")
    }
}

impl JobView {
    /// Whether other datacenters reach datacenter `p`'s Services at the
    /// address its `peerAccess` gives: when the job spans clusters (a
    /// `remote` datacenter among them) or `p` names a gateway. Datacenters
    /// that all share the hub cluster reach each other at cluster IPs.
    #[must_use]
    pub fn peers_use_peer_access(&self, p: &Placement) -> bool {
        self.placements.len() > 1
            && (p.datacenter.spec.peer_access.gateway_address.is_some()
                || self
                    .placements
                    .iter()
                    .any(|q| q.datacenter.spec.cluster.remote.is_some()))
    }

    /// The view of `job`, its SyncPolicy and the Datacenters it names, found
    /// in `datacenters`; its pods run the job's `spec.image`, else
    /// `default_image`.
    pub fn new(
        job: TrainingJob,
        policy: SyncPolicy,
        datacenters: &[Datacenter],
        default_image: &str,
    ) -> Result<Self, ViewError> {
        let mut missing = Vec::new();
        let mut placements = Vec::new();
        for spec in &job.spec.datacenters {
            match datacenters.iter().find(|d| d.name_any() == spec.name) {
                Some(dc) => placements.push(Placement::new(&job, spec.clone(), dc.clone())),
                None => missing.push(spec.name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(ViewError::MissingDatacenters(missing));
        }
        let plan = JobPlan::new(&job.spec, &policy.spec).map_err(ViewError::Plan)?;
        let image = job
            .spec
            .image
            .clone()
            .unwrap_or_else(|| default_image.to_owned());
        Ok(Self {
            job,
            policy,
            placements,
            plan,
            image,
        })
    }

    /// The view of a manifest's one job (as `geoml` reads example
    /// manifests) as if applied in `namespace`.
    pub fn from_manifest(
        manifest: &Manifest,
        namespace: &str,
        default_image: &str,
    ) -> Result<Self, ManifestError> {
        let resolved = manifest.job()?;
        let mut job = resolved.job.clone();
        job.metadata.namespace = Some(namespace.to_owned());
        Self::new(
            job,
            resolved.sync_policy.clone(),
            &manifest.datacenters,
            default_image,
        )
        .map_err(|e| match e {
            ViewError::MissingDatacenters(missing) => {
                ManifestError::MissingDatacenter(missing.join(", "))
            }
            ViewError::Plan(e) => ManifestError::Plan(e),
        })
    }

    fn job_name(&self) -> String {
        self.job.name_any()
    }

    /// True when the job runs Cartel's collaborative learning (with a registry).
    #[must_use]
    pub fn collaborative(&self) -> bool {
        self.policy.spec.inter_datacenter.model == InterDatacenterModel::Collaborative
    }

    /// Labels of every object of this job in datacenter `p`.
    #[must_use]
    pub fn labels(&self, p: &Placement) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_owned(), MANAGER.to_owned()),
            (JOB_LABEL.to_owned(), self.job_name()),
            (
                JOB_NAMESPACE_LABEL.to_owned(),
                self.job.namespace().unwrap_or_default(),
            ),
            (DATACENTER_LABEL.to_owned(), p.name().to_owned()),
        ])
    }

    fn meta(&self, p: &Placement, name: String, extra: &[(&str, String)]) -> ObjectMeta {
        let mut labels = self.labels(p);
        for (k, v) in extra {
            labels.insert((*k).to_owned(), v.clone());
        }
        ObjectMeta {
            name: Some(name),
            namespace: Some(p.namespace.clone()),
            labels: Some(labels),
            owner_references: p.owned.then(|| self.owner_reference()).flatten(),
            ..ObjectMeta::default()
        }
    }

    fn owner_reference(&self) -> Option<Vec<OwnerReference>> {
        self.job.controller_owner_ref(&()).map(|r| vec![r])
    }
}
