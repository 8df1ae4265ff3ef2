//! `TrainingJob`: a model trained across the datacenters it names.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A model trained across several datacenters: the operator starts parameter
/// servers and workers in every datacenter named here and wires them together
/// as the referenced SyncPolicy says.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "geoml.io",
    version = "v1alpha1",
    kind = "TrainingJob",
    doc = "A model trained across the datacenters it names.",
    namespaced,
    shortname = "tj",
    category = "geoml",
    status = "TrainingJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Datacenters","type":"string","jsonPath":".status.datacentersReady"}"#,
    printcolumn = r#"{"name":"Clock","type":"integer","jsonPath":".status.clock"}"#,
    printcolumn = r#"{"name":"Metric","type":"number","jsonPath":".status.metric"}"#,
    printcolumn = r#"{"name":"WAN-Bytes","type":"integer","jsonPath":".status.wanBytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobSpec {
    /// The model and its optimizer.
    pub model: ModelSpec,

    /// The data set and how it is partitioned over the datacenters.
    pub dataset: DatasetSpec,

    /// The datacenters the job runs in, each with its parameter-server and
    /// worker counts. At least one; names are unique.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub datacenters: Vec<DatacenterPlacement>,

    /// The SyncPolicy, in the job's namespace, that says how parameter
    /// servers synchronise.
    pub sync_policy_ref: SyncPolicyRef,

    /// When training stops: the first of the rules that are set to hold.
    #[serde(default)]
    pub stopping: StoppingRule,

    /// Periodic parameter-server checkpoints; a restarted parameter server
    /// resumes from the latest. Unset means no checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpointing>,

    /// Retries, deadlines, clean-up and suspension.
    #[serde(default)]
    pub run_policy: RunPolicy,

    /// Container image that runs `geoml ps|worker|registry`. Defaults to the
    /// image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Who issues the certificates of the job's mutual TLS. Unset: the
    /// operator makes a CA for the job and signs every role's certificate
    /// itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// Who issues the certificates of a job's mutual TLS.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A cert-manager issuer that signs every role's certificate instead of
    /// the operator: in each datacenter's cluster the operator creates one
    /// cert-manager `Certificate` per role, in the namespace the job's pods
    /// run in there, and cert-manager writes the role's TLS Secret (and
    /// renews it). The issuer must exist in every datacenter's cluster (an
    /// `Issuer` in that namespace, or a `ClusterIssuer`), sign with the same
    /// CA everywhere and write that CA as `ca.crt` (cert-manager's CA
    /// issuer does), so that roles of different datacenters trust each
    /// other. Pods start once every certificate is issued. Unset: the
    /// operator's own per-job CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// The group of cert-manager's own issuers.
pub const CERT_MANAGER_GROUP: &str = "cert-manager.io";

/// A reference to a cert-manager issuer, as a `Certificate`'s `issuerRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.group != 'cert-manager.io' || self.kind == 'Issuer' || self.kind == 'ClusterIssuer'")
    .message("kind must be Issuer or ClusterIssuer for group cert-manager.io")
    .field_path(".kind"))]
pub struct IssuerRef {
    /// Name of the issuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// `Issuer` (namespaced, in the namespace of the job's pods in every
    /// datacenter's cluster; the default) or `ClusterIssuer`; an external
    /// issuer's kind when `group` names one.
    #[serde(default = "default_issuer_kind")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,

    /// API group of the issuer. Default `cert-manager.io`.
    #[serde(default = "default_issuer_group")]
    #[schemars(length(min = 1, max = 253))]
    pub group: String,
}

fn default_issuer_kind() -> String {
    "Issuer".to_owned()
}

fn default_issuer_group() -> String {
    CERT_MANAGER_GROUP.to_owned()
}

/// The model to train and its optimizer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.kind == 'MLP' || !has(self.hiddenUnits)")
        .message("hiddenUnits is only allowed with kind MLP")
        .field_path(".hiddenUnits"),
    validation = Rule::new("self.kind == 'MatrixFactorization' || !has(self.rank)")
        .message("rank is only allowed with kind MatrixFactorization")
        .field_path(".rank"),
)]
pub struct ModelSpec {
    /// `SoftmaxRegression`, `MLP` (multi-layer perceptron), `MatrixFactorization`
    /// (for ratings), `OnlineLinear` or `OnlineForest` (small per-site models
    /// of collaborative learning).
    pub kind: ModelKind,

    /// Widths of the hidden layers of an `MLP`, for example `[128]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8))]
    pub hidden_units: Option<Vec<i32>>,

    /// Rank of the factors of `MatrixFactorization`. Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: Option<i32>,

    /// Update rule the parameter servers apply: `SGD` (default), `Momentum` or `Adam`.
    #[serde(default)]
    pub optimizer: Optimizer,

    /// Learning rate; must be greater than 0. Default 0.1.
    #[serde(default = "default_learning_rate")]
    #[x_kube(validation = Rule::new("self > 0.0").message("must be greater than 0"))]
    pub learning_rate: f64,

    /// Examples per mini-batch on each worker. Default 64.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: i32,

    /// L2 regularisation strength; at least 0. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub l2: f64,
}

impl ModelSpec {
    /// A model of `kind` with every other field at its default.
    #[must_use]
    pub fn new(kind: ModelKind) -> Self {
        Self {
            kind,
            hidden_units: None,
            rank: None,
            optimizer: Optimizer::default(),
            learning_rate: default_learning_rate(),
            batch_size: default_batch_size(),
            l2: 0.0,
        }
    }
}

fn default_learning_rate() -> f64 {
    0.1
}

fn default_batch_size() -> i32 {
    64
}

/// Kind of model.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Multinomial logistic regression.
    SoftmaxRegression,
    /// Multi-layer perceptron.
    #[serde(rename = "MLP")]
    Mlp,
    /// Low-rank matrix factorization of a ratings matrix.
    MatrixFactorization,
    /// Online linear classifier.
    OnlineLinear,
    /// Online random forest.
    OnlineForest,
}

impl ModelKind {
    /// Name of the metric a model of this kind is evaluated by (the
    /// `status.metricName` of its jobs): `accuracy`, or `rmse` for matrix
    /// factorization.
    #[must_use]
    pub fn metric_name(self) -> &'static str {
        match self {
            Self::MatrixFactorization => "rmse",
            Self::SoftmaxRegression | Self::Mlp | Self::OnlineLinear | Self::OnlineForest => {
                "accuracy"
            }
        }
    }
}

/// Update rule of the parameter servers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Optimizer {
    /// Plain stochastic gradient descent.
    #[default]
    #[serde(rename = "SGD")]
    Sgd,
    /// SGD with momentum 0.9.
    Momentum,
    /// Adam.
    Adam,
}

/// A data set and its partitioning over datacenters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// `FashionMNIST`, `MovieLens100K`, `Nycflights13`, `HAPT` or `Digits`
    /// (small, for quick tests).
    pub name: DatasetName,

    /// How the training data is split over datacenters.
    #[serde(default)]
    pub partitioning: Partitioning,

    /// PersistentVolumeClaim, in each datacenter's namespace, that holds the
    /// data set in the layout `geoml data fetch --data-dir DIR NAME` writes
    /// (docs/data.md). Pods mount it read-only and check every file's
    /// SHA-256; they never download. Default `geoml-data`. Not used with
    /// `Digits`, which is built into the image.
    #[serde(default = "default_data_claim")]
    pub claim_name: String,
}

/// The claim a data set is read from when `spec.dataset.claimName` is unset.
pub const DEFAULT_DATA_CLAIM: &str = "geoml-data";

fn default_data_claim() -> String {
    DEFAULT_DATA_CLAIM.to_owned()
}

/// A data set geoml knows how to obtain and load.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetName {
    /// Zalando's Fashion-MNIST images (10 classes).
    #[serde(rename = "FashionMNIST")]
    FashionMnist,
    /// MovieLens 100K ratings.
    MovieLens100K,
    /// Flights departing New York City in 2013.
    Nycflights13,
    /// Human activities and postural transitions (30 users).
    #[serde(rename = "HAPT")]
    Hapt,
    /// scikit-learn's 8x8 handwritten digits.
    Digits,
}

/// How training data is split over datacenters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.scheme == 'Dirichlet') == has(self.alpha)")
    .message("alpha is required with scheme Dirichlet and allowed only there")
    .field_path(".alpha"))]
pub struct Partitioning {
    /// `IID` (uniformly at random; default), `BySite` (by the data set's own
    /// site attribute, such as airport or user) or `Dirichlet` (class
    /// proportions per datacenter drawn from Dirichlet(alpha)).
    #[serde(default)]
    pub scheme: PartitionScheme,

    /// Concentration of the `Dirichlet` scheme; smaller is more skewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("must be greater than 0"))]
    pub alpha: Option<f64>,
}

/// Partitioning scheme.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartitionScheme {
    /// Independent and identically distributed.
    #[default]
    #[serde(rename = "IID")]
    Iid,
    /// By the data set's own site attribute.
    BySite,
    /// Class proportions drawn from a Dirichlet distribution.
    Dirichlet,
}

/// One datacenter of a job and the replicas it runs there.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatacenterPlacement {
    /// Name of a Datacenter object.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// Parameter-server processes; the model is sharded over them. Default 1.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 1024))]
    pub parameter_servers: i32,

    /// Worker processes; the datacenter's data is split over them. Default 1.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 4096))]
    pub workers: i32,

    /// Resource requests and limits of each role's containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<RoleResources>,
}

fn default_one() -> i32 {
    1
}

/// Resources of each role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoleResources {
    /// Resources of each parameter-server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_server: Option<ResourceRequirements>,

    /// Resources of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<ResourceRequirements>,
}

/// A reference to a SyncPolicy in the job's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncPolicyRef {
    /// Name of the SyncPolicy.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// When training stops. At least one rule is set; the first that holds ends
/// the job with `Succeeded`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.maxClocks) || has(self.targetMetric) || has(self.minRelativeChange)")
    .message("set at least one of maxClocks, targetMetric, minRelativeChange"))]
pub struct StoppingRule {
    /// Stop after this many clocks. Default 100 when no rule is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_clocks: Option<i64>,

    /// Stop once the evaluation metric reaches this value (accuracy: at or
    /// above; RMSE: at or below). In a per-datacenter mode (`ASP`,
    /// `FedAvg`, `DiLoCo`) a datacenter whose model reached it trains on
    /// until every other datacenter's has too (or stopped, or went
    /// unheard past the peer timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_metric: Option<f64>,

    /// Stop once the relative change between successive model versions
    /// (`‖w_t − w_{t−1}‖ / ‖w_{t−1}‖`) falls below this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("must be greater than 0"))]
    pub min_relative_change: Option<f64>,
}

impl Default for StoppingRule {
    fn default() -> Self {
        Self {
            max_clocks: Some(100),
            target_metric: None,
            min_relative_change: None,
        }
    }
}

/// Periodic checkpoints of the parameter servers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Checkpointing {
    /// Write a checkpoint every this many clocks. Default 10.
    #[serde(default = "default_checkpoint_interval")]
    #[schemars(range(min = 1))]
    pub interval_clocks: i32,

    /// PersistentVolumeClaim that holds the checkpoints (every shard in its
    /// own directory). Unset means an emptyDir, which survives container
    /// restarts but not pod deletion: a retried parameter server then starts
    /// from the initial model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
}

/// `checkpoint.intervalClocks` when a TrainingJob gives none.
pub const DEFAULT_CHECKPOINT_INTERVAL_CLOCKS: i32 = 10;

fn default_checkpoint_interval() -> i32 {
    DEFAULT_CHECKPOINT_INTERVAL_CLOCKS
}

/// Retries, deadlines, clean-up and suspension of a job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// How many times failed pods are recreated before the job is marked
    /// `Failed`. Default 3.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0))]
    pub backoff_limit: i32,

    /// Seconds the job may run, counted from its start, before it is marked
    /// `Failed` with reason `DeadlineExceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the job finishes before it is deleted with everything it
    /// created. Unset means it is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// Which pods to delete when the job finishes: `Running` (those still
    /// running; default), `All` or `None`.
    #[serde(default)]
    pub clean_pod_policy: CleanPodPolicy,

    /// True deletes the job's pods and keeps everything else; false again
    /// brings them back, resuming from the latest checkpoint.
    #[serde(default)]
    pub suspend: bool,

    /// The controller that reconciles this job. Unset means geoml's own
    /// operator; any other value makes it leave the job alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            clean_pod_policy: CleanPodPolicy::default(),
            suspend: false,
            managed_by: None,
        }
    }
}

fn default_backoff_limit() -> i32 {
    3
}

/// Which pods to delete when a job finishes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CleanPodPolicy {
    /// Delete pods still running.
    #[default]
    Running,
    /// Delete all pods.
    All,
    /// Keep all pods.
    None,
}

/// Observed state of a TrainingJob.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Standard conditions: `Created`, `Running`, `Succeeded`, `Failed`,
    /// `Suspended`, `DatacenterUnavailable`, each with a reason that says why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// One word for the job's state: `Pending`, `Running`, `Succeeded`,
    /// `Failed` or `Suspended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,

    /// Reason of the condition that explains the phase, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// Datacenters whose replicas are all ready, as `ready/total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenters_ready: Option<String>,

    /// Lowest clock reached by any datacenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<i64>,

    /// Name of the evaluation metric, for example `accuracy` or `rmse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_name: Option<String>,

    /// Latest value of the evaluation metric on held-out data: each
    /// datacenter's latest evaluation, averaged over the datacenters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<f64>,

    /// Bytes sent between datacenters so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan_bytes: Option<i64>,

    /// Times failed pods were recreated; the job fails once it passes
    /// `runPolicy.backoffLimit`.
    #[serde(default)]
    pub retries: i32,

    /// When the job started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Replica counts and progress per datacenter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_datacenter: Vec<DatacenterProgress>,

    /// Sync traffic per WAN link (one entry per sending and receiving
    /// datacenter), from the parameter servers' mirror counters: the modes
    /// with mirrors (Gaia's ASP, federated averaging) have links.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkTraffic>,

    /// Egress cost of the bytes delivered over every priced link so far, in
    /// the unit of the Datacenters' `wan.egressCostPerGiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_cost: Option<f64>,
}

/// One word for a job's state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobPhase {
    /// Objects are being created or pods are not yet running.
    Pending,
    /// Every datacenter trains.
    Running,
    /// A stopping rule held.
    Succeeded,
    /// The backoff limit or deadline was passed.
    Failed,
    /// `runPolicy.suspend` is true.
    Suspended,
}

/// Replicas and progress of one datacenter of a job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatacenterProgress {
    /// Name of the Datacenter.
    pub name: String,
    /// Parameter-server replicas (none in the Collaborative mode).
    pub parameter_servers: ReplicaCounts,
    /// Worker replicas; in the Collaborative mode, the datacenter's Cartel site.
    pub workers: ReplicaCounts,
    /// Clock of this datacenter's parameter servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<i64>,
    /// Bytes this datacenter sent over the WAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan_bytes_sent: Option<i64>,

    /// Fraction of the parameter updates made here that were sent to the
    /// other datacenters (Gaia's significance filter keeps the rest
    /// accumulated), over all shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates_sent_fraction: Option<f64>,
}

/// Sync traffic on the WAN link from one datacenter to another, summed over
/// the sender's shards.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LinkTraffic {
    /// The sending Datacenter.
    pub from: String,
    /// The receiving Datacenter.
    pub to: String,
    /// Bytes of mirror messages handed to the link.
    pub sent_bytes: i64,
    /// Of those, bytes the receiver acknowledged.
    pub delivered_bytes: i64,
    /// Delivered GiB times the sender's `wan.egressCostPerGiB` (unset when
    /// the sender has no price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_cost: Option<f64>,
    /// Round-trip time the mirror clock measured, averaged over shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_seconds: Option<f64>,
    /// Throughput acknowledged updates showed, summed over the shards'
    /// connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_bytes_per_second: Option<f64>,
}

/// Replica counts of one role.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Replicas the spec asks for.
    pub desired: i32,
    /// Replicas running and ready.
    pub ready: i32,
    /// Replicas that failed and wait to be recreated.
    pub failed: i32,
}
