//! `SyncPolicy`: how parameter servers synchronise inside and between datacenters.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the parameter servers of a TrainingJob synchronise: inside one
/// datacenter (BSP, SSP or asynchronous) and between datacenters (Gaia's ASP,
/// naive BSP/SSP over the WAN, federated averaging, DiLoCo, centralized,
/// isolated, or Cartel's collaborative learning). Editing it reaches running jobs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "geoml.io",
    version = "v1alpha1",
    kind = "SyncPolicy",
    doc = "How the parameter servers of TrainingJobs synchronise, inside and between datacenters.",
    namespaced,
    shortname = "sp",
    category = "geoml",
    printcolumn = r#"{"name":"Intra","type":"string","jsonPath":".spec.intraDatacenter.model"}"#,
    printcolumn = r#"{"name":"Inter","type":"string","jsonPath":".spec.interDatacenter.model"}"#,
    printcolumn = r#"{"name":"Threshold","type":"number","jsonPath":".spec.significance.threshold"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.wanBudgetMbps) || !has(self.wanBudgetShare)")
    .message("set at most one of wanBudgetMbps and wanBudgetShare")
    .field_path(".wanBudgetShare"))]
pub struct SyncPolicySpec {
    /// Consistency among the workers and parameter servers of one datacenter.
    #[serde(default)]
    pub intra_datacenter: IntraDatacenterSync,

    /// How datacenters exchange what they learn.
    #[serde(default)]
    pub inter_datacenter: InterDatacenterSync,

    /// Gaia's significance filter (model `ASP`): which accumulated updates are
    /// worth sending to the mirrors in other datacenters.
    #[serde(default)]
    pub significance: Significance,

    /// Gaia's ASP selective barrier: when significant updates pile up faster
    /// than the WAN carries them, first send the indexes on a control channel
    /// so that mirrors block reads of exactly those parameters until the
    /// values arrive.
    #[serde(default = "default_true")]
    pub selective_barrier: bool,

    /// Mirror-clock bound DS: a datacenter more than this many mirror clocks
    /// ahead of the slowest one blocks its workers until it catches up. The
    /// slowest one's mirror clock is the one it last told, plus the mirror
    /// clocks this datacenter makes in one and a half WAN round trips to it
    /// (the oldest a tick can be when it keeps pace).
    #[serde(default = "default_mirror_clock_bound")]
    #[schemars(range(min = 0, max = 1000))]
    pub mirror_clock_bound: i32,

    /// Clocks per mirror clock: a parameter server tells its mirrors its clock
    /// every this many of its own clocks, and `mirrorClockBound` counts in
    /// these mirror clocks. Default 20.
    #[serde(default = "default_mirror_clock_period")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub mirror_clock_period: i32,

    /// WAN bandwidth each link (one datacenter to another) may use for
    /// mirror messages under the `BandwidthBudget` threshold schedule, in
    /// megabits per second on the wire (framing included), split evenly
    /// among the sending datacenter's parameter servers. Unset:
    /// `wanBudgetShare` of the link's bandwidth. At most one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("must be greater than 0"))]
    pub wan_budget_mbps: Option<f64>,

    /// Share of each link's bandwidth, in (0, 1], that mirror updates may
    /// use under the `BandwidthBudget` threshold schedule, when
    /// `wanBudgetMbps` is unset. A link's bandwidth is the smaller
    /// `wan.bandwidthMbps` of its two Datacenters (a link neither sets has no
    /// budget: it sends whatever is significant). Default 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("must be in (0, 1]"))]
    pub wan_budget_share: Option<f64>,

    /// How the values of ASP mirror updates travel: `Float32` (exact;
    /// default), `BFloat16` (2 bytes a value) or `Int8` (1 byte a value and
    /// one scale per update). What the coding rounds off is kept, per link,
    /// and added to that element's next update, so no update is lost; the
    /// last update after training stops is exact.
    #[serde(default)]
    pub value_coding: ValueCoding,

    /// Averaging rounds (models `FedAvg` and `DiLoCo`).
    #[serde(default)]
    pub federated_averaging: FederatedAveraging,

    /// DiLoCo's outer optimizer (model `DiLoCo`).
    #[serde(default)]
    pub diloco: DiLoCo,

    /// Cartel collaborative learning (model `Collaborative`).
    #[serde(default)]
    pub collaborative: Collaborative,
}

fn default_true() -> bool {
    true
}

fn default_mirror_clock_bound() -> i32 {
    1
}

fn default_mirror_clock_period() -> i32 {
    20
}

/// Consistency inside one datacenter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.model == 'SSP' || !has(self.staleness)")
        .message("staleness is only allowed with model SSP")
        .field_path(".staleness"),
    validation = Rule::new("self.model != 'SSP' || has(self.staleness)")
        .message("model SSP needs a staleness bound")
        .field_path(".staleness"),
)]
pub struct IntraDatacenterSync {
    /// `BSP` (every worker waits for all others each clock), `SSP` (a worker
    /// may run up to `staleness` clocks ahead of the slowest) or `Async` (no
    /// waiting). Default `BSP`.
    #[serde(default)]
    pub model: ConsistencyModel,

    /// SSP staleness bound s in clocks; only with model `SSP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub staleness: Option<i32>,
}

/// Consistency model among workers of one datacenter.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsistencyModel {
    /// Bulk synchronous parallel.
    #[default]
    #[serde(rename = "BSP")]
    Bsp,
    /// Stale synchronous parallel.
    #[serde(rename = "SSP")]
    Ssp,
    /// Fully asynchronous.
    Async,
}

/// Synchronisation between datacenters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.model == 'SSP' || !has(self.staleness)")
        .message("staleness is only allowed with model SSP")
        .field_path(".staleness"),
    validation = Rule::new("self.model != 'SSP' || has(self.staleness)")
        .message("model SSP needs a staleness bound")
        .field_path(".staleness"),
)]
pub struct InterDatacenterSync {
    /// `ASP` (Gaia: each datacenter holds a full model; only significant
    /// updates cross the WAN; default), `BSP` or `SSP` (one parameter-server
    /// system spread naively over the WAN), `FedAvg` (train locally, average
    /// periodically), `DiLoCo` (train locally, then an outer Nesterov-momentum
    /// step on the averaged change), `Centralized` (ship the data to one datacenter, train
    /// there, ship the model back), `Isolated` (each datacenter trains alone),
    /// `Collaborative` (Cartel: small per-site models that borrow from logical
    /// neighbours on drift) or `LAN` (all datacenters as one, for comparison
    /// runs without a WAN).
    #[serde(default)]
    pub model: InterDatacenterModel,

    /// SSP staleness bound in clocks across the WAN; only with model `SSP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub staleness: Option<i32>,

    /// Seconds a datacenter may go unheard (no clock tick, update or
    /// announcement from its parameter servers; they tick at least every
    /// second) before its mirrors stop counting it for the mirror-clock
    /// bound, so that the others keep training through a WAN partition; it
    /// counts again as soon as it is heard, and what it missed or sent meanwhile
    /// arrives exactly once. Its pending selective-barrier announcements
    /// expire after the same time. The parameter servers report it in
    /// `geoml_mirror_peer_reachable` and `geoml_mirror_peers_reachable`.
    /// Model `ASP` (federated-averaging rounds wait for every datacenter).
    /// Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub peer_timeout_seconds: Option<i32>,
}

/// `interDatacenter.peerTimeoutSeconds` when a SyncPolicy gives none.
pub const DEFAULT_PEER_TIMEOUT_SECONDS: i32 = 30;

/// `wanBudgetShare` when a SyncPolicy gives neither it nor `wanBudgetMbps`.
pub const DEFAULT_WAN_BUDGET_SHARE: f64 = 0.1;

/// How datacenters exchange what they learn.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InterDatacenterModel {
    /// Gaia's Approximate Synchronous Parallel.
    #[default]
    #[serde(rename = "ASP")]
    Asp,
    /// Bulk synchronous parallel over the WAN.
    #[serde(rename = "BSP")]
    Bsp,
    /// Stale synchronous parallel over the WAN.
    #[serde(rename = "SSP")]
    Ssp,
    /// Federated averaging.
    FedAvg,
    /// DiLoCo: federated averaging's rounds, with an outer Nesterov-momentum
    /// step on the averaged change.
    #[serde(rename = "DiLoCo")]
    DiLoCo,
    /// All data shipped to one datacenter.
    Centralized,
    /// Every datacenter trains alone.
    Isolated,
    /// Cartel collaborative learning.
    Collaborative,
    /// All datacenters as one local network.
    #[serde(rename = "LAN")]
    Lan,
}

impl SyncPolicySpec {
    /// The fields, as paths under `spec`, that differ between `self` and
    /// `new` and that running pods cannot take: the consistency models,
    /// staleness, averaging rounds, the outer optimizer, the value coding and Cartel's parameters shape the
    /// processes themselves. Everything else (significance filter, WAN
    /// budget, selective barrier, mirror clock) applies live.
    #[must_use]
    pub fn changes_needing_new_pods(&self, new: &Self) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.inter_datacenter.model != new.inter_datacenter.model {
            fields.push("interDatacenter.model");
        }
        if self.inter_datacenter.staleness != new.inter_datacenter.staleness {
            fields.push("interDatacenter.staleness");
        }
        if self.inter_datacenter.peer_timeout_seconds != new.inter_datacenter.peer_timeout_seconds {
            fields.push("interDatacenter.peerTimeoutSeconds");
        }
        if self.intra_datacenter != new.intra_datacenter {
            fields.push("intraDatacenter");
        }
        if self.federated_averaging != new.federated_averaging {
            fields.push("federatedAveraging");
        }
        if self.diloco != new.diloco {
            fields.push("diloco");
        }
        if self.value_coding != new.value_coding {
            fields.push("valueCoding");
        }
        if self.collaborative != new.collaborative {
            fields.push("collaborative");
        }
        fields
    }
}

impl SyncPolicySpec {
    /// The policy's WAN budget (`wanBudgetMbps`, `wanBudgetShare`).
    #[must_use]
    pub fn wan_budget(&self) -> WanBudget {
        WanBudget {
            mbps: self.wan_budget_mbps,
            share: self.wan_budget_share.unwrap_or(DEFAULT_WAN_BUDGET_SHARE),
        }
    }
}

/// What WAN bandwidth mirror updates may use under the `BandwidthBudget`
/// schedule: an absolute rate per link, or a share of each link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WanBudget {
    /// `wanBudgetMbps`.
    pub mbps: Option<f64>,
    /// `wanBudgetShare`, or its default.
    pub share: f64,
}

impl WanBudget {
    /// The budget, in megabits per second, of a WAN link whose bandwidth is
    /// `link_mbps` (see [`crate::datacenter::link_bandwidth_mbps`]), for all
    /// the sending datacenter's parameter servers together: the absolute
    /// rate, or the share of the link. `None` when the link has no
    /// bandwidth and no absolute rate is set.
    #[must_use]
    pub fn of_link(self, link_mbps: Option<f64>) -> Option<f64> {
        self.mbps.or_else(|| link_mbps.map(|m| m * self.share))
    }
}

impl InterDatacenterModel {
    /// Whether the shards of every datacenter form one parameter server that
    /// every worker pushes to (LAN, naive WAN BSP/SSP, Centralized); the other
    /// models keep a full model per datacenter over its own shards, and shard
    /// i mirrors shard i of the other datacenters. The operator's topology and
    /// the runtime's placement both follow this one definition.
    #[must_use]
    pub fn is_global(self) -> bool {
        matches!(self, Self::Lan | Self::Bsp | Self::Ssp | Self::Centralized)
    }
}

impl SyncPolicySpec {
    /// The outer step that closes an averaging round, for the models that
    /// average in rounds: DiLoCo's from `diloco`, and federated averaging's,
    /// which is DiLoCo's with outer learning rate 1 and no momentum
    /// ([`OuterStep::FED_AVG`]). `None` for the other models.
    #[must_use]
    pub fn outer_step(&self) -> Option<OuterStep> {
        match self.inter_datacenter.model {
            InterDatacenterModel::FedAvg => Some(OuterStep::FED_AVG),
            InterDatacenterModel::DiLoCo => Some(OuterStep {
                learning_rate: self.diloco.outer_learning_rate,
                momentum: self.diloco.outer_momentum,
            }),
            _ => None,
        }
    }
}

/// The outer optimizer of an averaging round (DiLoCo, Douillard et al.
/// 2023): SGD with Nesterov momentum on the outer gradient, which is minus
/// the change of the model averaged over the datacenters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OuterStep {
    /// Outer learning rate.
    pub learning_rate: f64,
    /// Nesterov momentum, in [0, 1).
    pub momentum: f64,
}

impl OuterStep {
    /// Federated averaging: every round moves the model by the averaged change.
    pub const FED_AVG: OuterStep = OuterStep {
        learning_rate: 1.0,
        momentum: 0.0,
    };

    /// One element's outer step: with `change` its change averaged over the
    /// datacenters this round and `velocity` its momentum buffer (updated in
    /// place), the change to make to its value at the start of the round.
    ///
    /// In the outer gradient's terms (g = −change), this is PyTorch's SGD
    /// with Nesterov momentum: `v ← μ·v + g`, `θ ← θ − lr·(g + μ·v)`.
    #[must_use]
    pub fn step(self, change: f32, velocity: &mut f32) -> f32 {
        #[allow(clippy::cast_possible_truncation)] // checked small rates
        let (lr, mu) = (self.learning_rate as f32, self.momentum as f32);
        *velocity = mu * *velocity + change;
        lr * (change + mu * *velocity)
    }
}

/// Gaia's significance filter and the schedule of its threshold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(self.schedule == 'LinearToFloor') == has(self.floor)")
        .message("floor is required with schedule LinearToFloor and allowed only there")
        .field_path(".floor"),
    validation = Rule::new("!has(self.floor) || self.floor < self.threshold")
        .message("floor must be below threshold")
        .field_path(".floor"),
    validation = Rule::new("(self.schedule == 'LinearToFloor') == has(self.decayClocks)")
        .message("decayClocks is required with schedule LinearToFloor and allowed only there")
        .field_path(".decayClocks"),
)]
pub struct Significance {
    /// How significant an accumulated update is: `RelativeChange`
    /// (`|accumulated / value|`, always significant when the value is 0;
    /// default) or `AbsoluteChange` (`|accumulated|`).
    #[serde(default)]
    pub function: SignificanceFunction,

    /// Initial threshold, in (0, 1]: an accumulated update is sent to the
    /// mirrors once its significance exceeds it. Default 0.01 (1%, as in Gaia).
    #[serde(default = "default_threshold")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("must be in (0, 1]"))]
    pub threshold: f64,

    /// How the threshold changes over clocks t: `Constant` (default),
    /// `InverseSqrt` (`threshold / sqrt(t)`), `LinearToFloor` (linear from
    /// `threshold` to `floor` over `decayClocks`) or `BandwidthBudget`
    /// (what is significant at `threshold` is queued for every WAN link, and
    /// each link sends, whenever it is free, the most significant of its
    /// queue that its budget allows: `wanBudgetMbps`, or `wanBudgetShare` of
    /// its bandwidth; the rest keeps accumulating in the queue).
    #[serde(default)]
    pub schedule: ThresholdSchedule,

    /// Lowest threshold of the `LinearToFloor` schedule; below `threshold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("must be greater than 0"))]
    pub floor: Option<f64>,

    /// Clocks over which `LinearToFloor` reaches its floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub decay_clocks: Option<i64>,
}

impl Default for Significance {
    fn default() -> Self {
        Self {
            function: SignificanceFunction::default(),
            threshold: default_threshold(),
            schedule: ThresholdSchedule::default(),
            floor: None,
            decay_clocks: None,
        }
    }
}

fn default_threshold() -> f64 {
    0.01
}

/// How the significance of an accumulated update is measured.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SignificanceFunction {
    /// `|accumulated / value|`, always significant when the value is 0.
    #[default]
    RelativeChange,
    /// `|accumulated|`.
    AbsoluteChange,
}

/// How the significance threshold changes over time.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ThresholdSchedule {
    /// The threshold never changes.
    #[default]
    Constant,
    /// `threshold / sqrt(t)`.
    InverseSqrt,
    /// Linear from `threshold` to `floor` over `decayClocks`.
    LinearToFloor,
    /// Each WAN link sends the most significant of what is queued for it
    /// that its budget (`wanBudgetMbps` or `wanBudgetShare`) allows.
    BandwidthBudget,
}

/// How the values of mirror updates are coded on the wire.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueCoding {
    /// 4-byte IEEE floats: exact.
    #[default]
    Float32,
    /// The upper 2 bytes of each float, rounded to nearest: 8 significant
    /// bits, the full range of a float.
    BFloat16,
    /// One signed byte per value times one float scale per update (the
    /// largest magnitude over 127); values that round to 0 wait.
    Int8,
}

impl ValueCoding {
    /// Bytes a value takes on the wire in this coding.
    #[must_use]
    pub fn bytes_per_value(self) -> usize {
        match self {
            Self::Float32 => 4,
            Self::BFloat16 => 2,
            Self::Int8 => 1,
        }
    }
}

/// Averaging rounds (federated averaging and DiLoCo).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FederatedAveraging {
    /// Clocks each datacenter trains locally between two averaging rounds
    /// (DiLoCo's H).
    #[serde(default = "default_round_clocks")]
    #[schemars(range(min = 1))]
    pub round_clocks: i32,
}

impl Default for FederatedAveraging {
    fn default() -> Self {
        Self {
            round_clocks: default_round_clocks(),
        }
    }
}

fn default_round_clocks() -> i32 {
    10
}

/// DiLoCo's outer optimizer: every `federatedAveraging.roundClocks` clocks
/// the datacenters average their change since the last round, and each
/// moves its model from where the round started by SGD with Nesterov
/// momentum on that averaged change. Outer learning rate 1 and momentum 0
/// is federated averaging.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiLoCo {
    /// Outer learning rate, in (0, 10]. Default 0.7 (DiLoCo's).
    #[serde(default = "default_outer_learning_rate")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0").message("must be in (0, 10]"))]
    pub outer_learning_rate: f64,

    /// Nesterov momentum of the outer step, in [0, 1). Default 0.9 (DiLoCo's).
    #[serde(default = "default_outer_momentum")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("must be in [0, 1)"))]
    pub outer_momentum: f64,
}

impl Default for DiLoCo {
    fn default() -> Self {
        Self {
            outer_learning_rate: default_outer_learning_rate(),
            outer_momentum: default_outer_momentum(),
        }
    }
}

fn default_outer_learning_rate() -> f64 {
    0.7
}

fn default_outer_momentum() -> f64 {
    0.9
}

/// Cartel collaborative-learning parameters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Collaborative {
    /// Drift window W: number of recent batches whose error rate is watched.
    #[serde(default = "default_drift_window")]
    #[schemars(range(min = 1))]
    pub drift_window: i32,

    /// Drift limit L: error rate over the window, in (0, 1], above which a
    /// site asks its logical neighbours for help.
    #[serde(default = "default_drift_limit")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("must be in (0, 1]"))]
    pub drift_limit: f64,

    /// Number k of logical neighbours (smallest Jensen–Shannon divergence)
    /// to fetch model portions from.
    #[serde(default = "default_neighbours")]
    #[schemars(range(min = 1))]
    pub neighbours: i32,

    /// Refresh a site's metadata in the registry every m batches.
    #[serde(default = "default_metadata_interval")]
    #[schemars(range(min = 1))]
    pub metadata_interval_batches: i32,

    /// Also refresh it when the class priors move by more than this total
    /// variation distance, in (0, 1].
    #[serde(default = "default_metadata_change")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("must be in (0, 1]"))]
    pub metadata_change_threshold: f64,
}

impl Default for Collaborative {
    fn default() -> Self {
        Self {
            drift_window: default_drift_window(),
            drift_limit: default_drift_limit(),
            neighbours: default_neighbours(),
            metadata_interval_batches: default_metadata_interval(),
            metadata_change_threshold: default_metadata_change(),
        }
    }
}

fn default_drift_window() -> i32 {
    50
}

fn default_drift_limit() -> f64 {
    0.3
}

fn default_neighbours() -> i32 {
    2
}

fn default_metadata_interval() -> i32 {
    20
}

fn default_metadata_change() -> f64 {
    0.05
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::float_cmp)] // exact binary fractions
    fn diloco_outer_step_matches_a_hand_computed_example() {
        let diloco = OuterStep {
            learning_rate: 0.5,
            momentum: 0.5,
        };
        let mut v = 0.0;
        // Round 1, averaged change 1: v = 0.5·0 + 1 = 1; step 0.5·(1 + 0.5·1) = 0.75.
        assert_eq!(diloco.step(1.0, &mut v), 0.75);
        assert_eq!(v, 1.0);
        // Round 2, change −2: v = 0.5·1 − 2 = −1.5; step 0.5·(−2 + 0.5·(−1.5)) = −1.375.
        assert_eq!(diloco.step(-2.0, &mut v), -1.375);
        assert_eq!(v, -1.5);
        // Round 3, no change: momentum alone moves it, 0.5·(0 + 0.5·(−0.75)) = −0.1875.
        assert_eq!(diloco.step(0.0, &mut v), -0.1875);
        // Federated averaging moves by the averaged change, whatever came before.
        let mut v = 3.0;
        assert_eq!(OuterStep::FED_AVG.step(0.25, &mut v), 0.25);
        assert_eq!(OuterStep::FED_AVG.step(-0.5, &mut v), -0.5);
    }

    #[test]
    fn fed_avg_and_diloco_have_outer_steps_and_the_rest_none() {
        let mut spec: SyncPolicySpec = crate::yaml::from_str("{}").unwrap();
        assert_eq!(spec.outer_step(), None);
        spec.inter_datacenter.model = InterDatacenterModel::FedAvg;
        assert_eq!(spec.outer_step(), Some(OuterStep::FED_AVG));
        spec.inter_datacenter.model = InterDatacenterModel::DiLoCo;
        assert_eq!(
            spec.outer_step(),
            Some(OuterStep {
                learning_rate: 0.7,
                momentum: 0.9
            })
        );
    }

    #[test]
    #[allow(clippy::float_cmp)] // exact products
    fn a_link_budget_is_an_absolute_rate_or_a_share_of_the_link() {
        let mut spec: SyncPolicySpec = crate::yaml::from_str("{}").unwrap();
        assert_eq!(spec.wan_budget().of_link(None), None);
        assert_eq!(spec.wan_budget().of_link(Some(20.0)), Some(2.0));
        spec.wan_budget_share = Some(0.5);
        assert_eq!(spec.wan_budget().of_link(Some(20.0)), Some(10.0));
        spec.wan_budget_share = None;
        spec.wan_budget_mbps = Some(3.0);
        assert_eq!(spec.wan_budget().of_link(Some(20.0)), Some(3.0));
        assert_eq!(spec.wan_budget().of_link(None), Some(3.0));
    }
}
