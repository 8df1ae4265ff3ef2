//! Reads multi-document YAML manifests of geoml objects and resolves a
//! TrainingJob's references (its SyncPolicy and Datacenters).

use std::path::Path;

use crate::plan::{JobPlan, PlanError};
use crate::validate;
use crate::{Datacenter, SyncPolicy, TrainingJob};
use kube::ResourceExt;
use serde::Deserialize;

/// What can be wrong with a manifest file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("reading {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: std::io::Error,
    },
    /// The file is not YAML.
    #[error("{}", .0.without_snippet())]
    Yaml(crate::yaml::Error),
    /// A document is not valid for its kind.
    #[error("document {index}: {reason}")]
    Object {
        /// Position of the document in the stream, from 1, empty ones skipped.
        index: usize,
        /// Why.
        reason: serde_json::Error,
    },
    /// A document breaks its CRD's schema or rules: the apiserver would refuse it.
    #[error("document {index} ({kind} {name:?}): {fields}")]
    Invalid {
        /// Position of the document in the stream, from 1.
        index: usize,
        /// Its `kind`.
        kind: String,
        /// Its `metadata.name`.
        name: String,
        /// Every field it breaks.
        fields: validate::Invalid,
    },
    /// A document is not a geoml object.
    #[error(
        "document {index}: {api_version} {kind} is not a geoml.io/v1alpha1 Datacenter, SyncPolicy or TrainingJob"
    )]
    UnknownKind {
        /// Position of the document in the stream, from 1.
        index: usize,
        /// Its `apiVersion`.
        api_version: String,
        /// Its `kind`.
        kind: String,
    },
    /// There is not exactly one TrainingJob.
    #[error("expected exactly one TrainingJob, found {0}")]
    JobCount(usize),
    /// The job names a SyncPolicy the manifest does not hold.
    #[error("spec.syncPolicyRef.name: SyncPolicy {0:?} is not in the manifest")]
    MissingSyncPolicy(String),
    /// The job names a Datacenter the manifest does not hold.
    #[error("spec.datacenters: Datacenter {0:?} is not in the manifest")]
    MissingDatacenter(String),
    /// A value of the job or its SyncPolicy is unusable.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// The geoml objects of one manifest file, in file order.
#[derive(Debug, Default)]
pub struct Manifest {
    /// Every Datacenter.
    pub datacenters: Vec<Datacenter>,
    /// Every SyncPolicy.
    pub sync_policies: Vec<SyncPolicy>,
    /// Every TrainingJob.
    pub training_jobs: Vec<TrainingJob>,
}

/// A TrainingJob with the objects it references.
#[derive(Debug)]
pub struct ResolvedJob<'a> {
    /// The job.
    pub job: &'a TrainingJob,
    /// Its SyncPolicy.
    pub sync_policy: &'a SyncPolicy,
    /// Its Datacenters, in the order the job lists them.
    pub datacenters: Vec<&'a Datacenter>,
    /// The job's checked numbers.
    pub plan: JobPlan,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

impl Manifest {
    /// Reads a manifest file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ManifestError::Read {
            path: path.display().to_string(),
            reason,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses a stream of YAML documents; empty documents are skipped.
    pub fn from_yaml(text: &str) -> Result<Self, ManifestError> {
        let mut manifest = Self::default();
        let documents = crate::yaml::documents(text).map_err(ManifestError::Yaml)?;
        let crds = crate::crds();
        for (i, mut value) in documents.into_iter().enumerate() {
            let index = i + 1;
            let object = |reason| ManifestError::Object { index, reason };
            let meta = TypeMeta::deserialize(&value).map_err(object)?;
            let crd = crds
                .iter()
                .find(|crd| crd.spec.names.kind == meta.kind)
                .filter(|_| meta.api_version == format!("{}/{}", crate::GROUP, crate::VERSION))
                .ok_or_else(|| ManifestError::UnknownKind {
                    index,
                    api_version: meta.api_version.clone(),
                    kind: meta.kind.clone(),
                })?;
            validate::object(crd, &mut value).map_err(|fields| ManifestError::Invalid {
                index,
                kind: meta.kind.clone(),
                name: value["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                fields,
            })?;
            match meta.kind.as_str() {
                "Datacenter" => manifest
                    .datacenters
                    .push(serde_json::from_value(value).map_err(object)?),
                "SyncPolicy" => manifest
                    .sync_policies
                    .push(serde_json::from_value(value).map_err(object)?),
                _ => manifest
                    .training_jobs
                    .push(serde_json::from_value(value).map_err(object)?),
            }
        }
        Ok(manifest)
    }

    /// The manifest's one TrainingJob with its SyncPolicy and Datacenters.
    pub fn job(&self) -> Result<ResolvedJob<'_>, ManifestError> {
        let [job] = self.training_jobs.as_slice() else {
            return Err(ManifestError::JobCount(self.training_jobs.len()));
        };
        let policy_name = &job.spec.sync_policy_ref.name;
        let sync_policy = self
            .sync_policies
            .iter()
            .find(|p| &p.name_any() == policy_name)
            .ok_or_else(|| ManifestError::MissingSyncPolicy(policy_name.clone()))?;
        let datacenters = job
            .spec
            .datacenters
            .iter()
            .map(|placement| {
                self.datacenters
                    .iter()
                    .find(|dc| dc.name_any() == placement.name)
                    .ok_or_else(|| ManifestError::MissingDatacenter(placement.name.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(ResolvedJob {
            plan: JobPlan::new(&job.spec, &sync_policy.spec)?,
            job,
            sync_policy,
            datacenters,
        })
    }
}
