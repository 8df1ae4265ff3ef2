//! The topology ConfigMap: each datacenter's `topology.yaml` and the
//! job's `manifest.yaml`.

use std::collections::BTreeMap;

use geoml_crds::{Datacenter, SyncPolicy, Topology, TrainingJob};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Endpoints, JobView, names};

impl JobView {
    /// The topology of datacenter number `dc`, given where every
    /// datacenter's shards and the registry are reached.
    #[must_use]
    pub fn topology(&self, dc: usize, endpoints: &Endpoints) -> Topology {
        let own = &self.placements[dc];
        let urls = |table: &[Vec<String>], j: usize| table.get(j).cloned().unwrap_or_default();
        let parameter_servers = if self.policy.spec.inter_datacenter.model.is_global() {
            (0..self.placements.len())
                .flat_map(|j| {
                    if j == dc {
                        urls(&endpoints.local, j)
                    } else {
                        urls(&endpoints.peer, j)
                    }
                })
                .collect()
        } else {
            urls(&endpoints.local, dc)
        };
        let mirrors = self
            .placements
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != dc)
            .map(|(j, p)| (p.name().to_owned(), urls(&endpoints.peer, j)))
            .collect();
        let registry = self.collaborative().then(|| {
            let (local, peer) = endpoints.registry.clone().unwrap_or_default();
            if dc == 0 { local } else { peer }
        });
        Topology {
            datacenter: own.name().to_owned(),
            parameter_servers,
            mirrors,
            registry,
        }
    }

    /// `manifest.yaml`: the job's Datacenters, its SyncPolicy and the job
    /// itself (names and specs only), as `geoml_runtime::manifest` reads it.
    pub fn manifest_yaml(&self) -> Result<String, geoml_crds::yaml::SerializeError> {
        let mut out = String::new();
        for p in &self.placements {
            let dc = Datacenter {
                metadata: bare_meta(&p.datacenter.metadata),
                spec: p.datacenter.spec.clone(),
                status: None,
            };
            push_document(&mut out, &dc)?;
        }
        let policy = SyncPolicy {
            metadata: bare_meta(&self.policy.metadata),
            spec: self.policy.spec.clone(),
        };
        push_document(&mut out, &policy)?;
        let job = TrainingJob {
            metadata: bare_meta(&self.job.metadata),
            spec: self.job.spec.clone(),
            status: None,
        };
        push_document(&mut out, &job)?;
        Ok(out)
    }

    /// The topology ConfigMap of datacenter number `dc`.
    pub fn config_map(
        &self,
        dc: usize,
        manifest: &str,
        topology: &Topology,
    ) -> Result<ConfigMap, geoml_crds::yaml::SerializeError> {
        let p = &self.placements[dc];
        Ok(ConfigMap {
            metadata: self.meta(p, names::config_map(&self.job_name(), p.name()), &[]),
            data: Some(BTreeMap::from([
                ("manifest.yaml".to_owned(), manifest.to_owned()),
                ("topology.yaml".to_owned(), topology.to_yaml()?),
            ])),
            ..ConfigMap::default()
        })
    }
}

fn bare_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        ..ObjectMeta::default()
    }
}

fn push_document<T: serde::Serialize>(
    out: &mut String,
    value: &T,
) -> Result<(), geoml_crds::yaml::SerializeError> {
    out.push_str("---\n");
    out.push_str(&geoml_crds::yaml::to_string(value)?);
    Ok(())
}
