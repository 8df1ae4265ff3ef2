//! The topology file: how one datacenter's parameter servers and workers find
//! each other and their mirrors in other datacenters.
//!
//! The operator writes it into each datacenter's topology ConfigMap (key
//! `topology.yaml`, next to `manifest.yaml`, the Datacenters, SyncPolicy and
//! TrainingJob as one multi-document YAML); `geoml run` writes the same file
//! for each emulated datacenter. Every role reads it with `--topology`:
//!
//! ```text
//! geoml ps       --manifest M --topology T --shard I --listen 0.0.0.0:7070 [--metrics-listen ...] [--checkpoint-dir ...] [--termination-log ...]
//! geoml worker   --manifest M --topology T --index I [--metrics-listen ...]
//! geoml site     --manifest M --topology T --listen 0.0.0.0:7072 --advertise URL --expect-sites N   (Collaborative)
//! ```
//!
//! `--shard` and `--index` count from 0 within the datacenter. Shard and worker
//! counts come from the TrainingJob's `spec.datacenters`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The datacenter a role runs in and the endpoints it talks to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    /// The datacenter this file is for (a name in `spec.datacenters`).
    pub datacenter: String,
    /// gRPC URLs (`http://host:port`) of the shards this datacenter's workers
    /// push to, in shard order; on Kubernetes the datacenter's own shards are
    /// at their Services' cluster IPs (no cluster DNS needed). With a per-datacenter model (ASP, FedAvg, DiLoCo,
    /// Isolated, Centralized, Collaborative) these are the datacenter's own
    /// shards. With naive WAN BSP/SSP they are every datacenter's shards, in
    /// `spec.datacenters` order, and remote ones are reached over the WAN.
    pub parameter_servers: Vec<String>,
    /// For each other datacenter, the gRPC URLs of its shards in shard order,
    /// as reachable from this datacenter (a Service address or the
    /// Datacenter's `peerAccess.gatewayAddress`). Shard `i` here mirrors shard
    /// `i` of every peer.
    #[serde(default)]
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// gRPC URL of the Cartel registry, in the Collaborative mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
}

impl Topology {
    /// Parses a topology file.
    pub fn from_yaml(text: &str) -> Result<Self, crate::yaml::Error> {
        crate::yaml::from_str(text)
    }

    /// The file's text.
    pub fn to_yaml(&self) -> Result<String, crate::yaml::SerializeError> {
        crate::yaml::to_string(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_yaml() {
        let topology = Topology {
            datacenter: "us-east".into(),
            parameter_servers: vec!["http://job-us-east-ps-0.job-us-east:7070".into()],
            mirrors: BTreeMap::from([("eu-west".into(), vec!["http://203.0.113.7:30070".into()])]),
            registry: None,
        };
        let text = topology.to_yaml().unwrap();
        assert!(text.contains("parameterServers"), "{text}");
        assert_eq!(Topology::from_yaml(&text).unwrap(), topology);
    }
}
