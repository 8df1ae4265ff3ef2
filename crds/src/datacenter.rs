//! `Datacenter`: one site of a geo-distributed job and the WAN link it offers.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A datacenter that TrainingJobs can place parameter servers and workers in:
/// a region, the cluster that runs its pods, the WAN link it offers to its
/// peers, and how those peers reach its parameter servers.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "geoml.io",
    version = "v1alpha1",
    kind = "Datacenter",
    doc = "A datacenter that TrainingJobs can place parameter servers and workers in.",
    shortname = "dc",
    category = "geoml",
    status = "DatacenterStatus",
    printcolumn = r#"{"name":"Region","type":"string","jsonPath":".spec.region"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.conditions[?(@.type==\"Active\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Active\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DatacenterSpec {
    /// Geographic region of the datacenter, for example `eu-west-1`. Shown in
    /// `kubectl get dc` and used as a label on metrics.
    #[schemars(length(min = 1))]
    pub region: String,

    /// The Kubernetes cluster that runs this datacenter's pods: exactly one of
    /// `local` (the cluster the operator runs in) or `remote` (another cluster,
    /// reached through a kubeconfig Secret).
    pub cluster: ClusterSource,

    /// The WAN link this datacenter offers to its peers. `geoml run` emulates
    /// it locally; the significance filter's bandwidth budget and the
    /// benchmarks read it. Unset means a link with no shaping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<WanLink>,

    /// How parameter servers of other datacenters reach this datacenter's
    /// parameter servers, in jobs whose datacenters span clusters (a
    /// `remote` one among them). When every datacenter of a job is `local`
    /// they share the cluster and reach each other at cluster IPs, unless
    /// a `gatewayAddress` is set.
    #[serde(default)]
    pub peer_access: PeerAccess,
}

/// Where a datacenter's pods run. Exactly one of `local` and `remote` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.local) != has(self.remote)")
    .message("exactly one of local or remote must be set"))]
pub struct ClusterSource {
    /// Run pods in the cluster the operator itself runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalCluster>,

    /// Run pods in another cluster, reached with the kubeconfig stored in a
    /// Secret (as Kueue's MultiKueueCluster does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteCluster>,
}

/// A datacenter inside the operator's own cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalCluster {
    /// Namespace the datacenter's pods run in. Defaults to the namespace of
    /// the TrainingJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// Node labels that pin this datacenter's pods to its nodes, for example
    /// `topology.kubernetes.io/region: eu-west-1`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// A datacenter in another Kubernetes cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteCluster {
    /// The Secret holding a kubeconfig for the remote cluster.
    pub kubeconfig_secret_ref: SecretKeyRef,

    /// Namespace in the remote cluster that the datacenter's pods run in.
    /// Defaults to the namespace of the TrainingJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// Node labels that pin this datacenter's pods to nodes of the remote cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

/// A key of a Secret in a named namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,

    /// Namespace of the Secret (Datacenters are cluster-scoped, so it must be
    /// named). It must be the operator's own namespace (the Helm release's,
    /// `geoml-system` by default): the operator reads no Secret elsewhere,
    /// and a Datacenter naming one is not Active (reason
    /// `KubeconfigSecretOutsideOperatorNamespace`).
    #[schemars(length(min = 1))]
    pub namespace: String,

    /// Key in the Secret's data that holds the kubeconfig.
    #[serde(default = "default_kubeconfig_key")]
    pub key: String,
}

fn default_kubeconfig_key() -> String {
    "kubeconfig".to_owned()
}

/// The bandwidth, in megabits per second, of the WAN link between two
/// datacenters that offer `a` and `b` (their `wan.bandwidthMbps`): the
/// smaller of the two, or the one given; `None` (unshaped) when neither is.
/// The WAN emulator shapes links by it and the bandwidth budget divides it.
#[must_use]
pub fn link_bandwidth_mbps(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// The WAN link a datacenter offers: its bandwidth, latency and egress price.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WanLink {
    /// Bandwidth of the link in megabits per second; must be greater than 0.
    #[x_kube(validation = Rule::new("self > 0.0").message("must be greater than 0"))]
    pub bandwidth_mbps: f64,

    /// One-way latency of the link in milliseconds; the round-trip time
    /// between two datacenters is the sum of their latencies.
    #[serde(default)]
    #[schemars(range(min = 0, max = 60000))]
    pub latency_ms: i32,

    /// Price of one GiB leaving this datacenter, in the currency the platform
    /// team reports in. Used to report the cost of WAN traffic.
    #[serde(
        default,
        rename = "egressCostPerGiB",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0))]
    pub egress_cost_per_gib: Option<f64>,
}

/// How peers reach this datacenter's parameter servers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAccess {
    /// Type of the Service that exposes the parameter servers' mirror port:
    /// `LoadBalancer` (default), `NodePort` or `ClusterIP`.
    #[serde(default)]
    pub service_type: PeerServiceType,

    /// An explicit `host:port` that peers dial instead of the Service's own
    /// address, for a gateway or tunnel in front of the datacenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9.-]+:[0-9]{1,5}$')")
        .message("must be host:port"))]
    pub gateway_address: Option<String>,
}

/// Type of the Service that exposes a datacenter's parameter servers to peers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerServiceType {
    /// A cloud load balancer with an external address.
    #[default]
    LoadBalancer,
    /// A port on every node.
    NodePort,
    /// A cluster-internal address, for peers in the same cluster or behind a gateway.
    #[serde(rename = "ClusterIP")]
    ClusterIp,
}

/// Observed state of a Datacenter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatacenterStatus {
    /// `Active` is True while the datacenter's cluster answers; its reason
    /// says why not (for example `KubeconfigSecretMissing`, `Unreachable`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Round-trip time and throughput to every peer datacenter, as the
    /// mirror clock of the latest job with mirrors here (Gaia's ASP,
    /// federated averaging) measured them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerLinkStatus>,
}

/// What the mirror-clock exchange measured on the link to one peer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerLinkStatus {
    /// Name of the peer Datacenter.
    pub datacenter: String,
    /// Measured round-trip time in milliseconds.
    pub rtt_ms: f64,
    /// Measured throughput in megabits per second.
    pub throughput_mbps: f64,
    /// When the figures were measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<Time>,
}
