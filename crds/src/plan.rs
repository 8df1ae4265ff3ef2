//! A job's checked plan, built once from its TrainingJob and SyncPolicy (the
//! linfa `ParamGuard` habit).
//!
//! The API types hold what users write: Kubernetes `int32`/`int64` fields,
//! optional values, defaults filled in by serde. The roles, the launcher and
//! the operator work with a [`JobPlan`] instead: counts as `usize`, clocks as
//! `u64`, every optional value resolved to its documented default here and
//! nowhere else. A value the plan's types cannot hold (a count below 1, a
//! negative clock) is an error naming the field, never a silent clamp. The
//! CRD's schema states the full ranges; the apiserver enforces them.

use std::fmt::Display;

use crate::sync_policy::{DEFAULT_PEER_TIMEOUT_SECONDS, SyncPolicySpec};
use crate::training_job::{DEFAULT_CHECKPOINT_INTERVAL_CLOCKS, TrainingJobSpec};

/// A field whose value a plan cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: must be at least {min}, got {value}")]
pub struct PlanError {
    /// The field's path, as the apiserver names it (`spec.model.batchSize`).
    pub field: String,
    /// The smallest usable value.
    pub min: u64,
    /// The value given.
    pub value: String,
}

/// `value` of `field` as a number of at least `min`, in the type `N` the
/// plan holds it in (`u64` clocks, `usize` counts).
fn at_least<N, T>(field: impl Display, value: T, min: u64) -> Result<N, PlanError>
where
    T: TryInto<u64> + Display + Copy,
    N: TryFrom<u64>,
{
    value
        .try_into()
        .ok()
        .filter(|&v| v >= min)
        .and_then(|v| N::try_from(v).ok())
        .ok_or_else(|| PlanError {
            field: field.to_string(),
            min,
            value: value.to_string(),
        })
}

/// One datacenter of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatacenterPlan {
    /// The Datacenter's name.
    pub name: String,
    /// Its parameter-server shards (`parameterServers`).
    pub shards: usize,
    /// Its workers (`workers`).
    pub workers: usize,
}

/// A SyncPolicy's numbers, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyPlan {
    /// `intraDatacenter.staleness`, 0 when unset.
    pub intra_staleness: u64,
    /// `interDatacenter.staleness`, 0 when unset.
    pub inter_staleness: u64,
    /// `mirrorClockBound`: mirror clocks a datacenter may run ahead.
    pub mirror_clock_bound: u64,
    /// `mirrorClockPeriod`: clocks per mirror clock.
    pub mirror_clock_period: u64,
    /// `interDatacenter.peerTimeoutSeconds`, or its default.
    pub peer_timeout_seconds: u64,
    /// `federatedAveraging.roundClocks`.
    pub round_clocks: u64,
    /// `significance.decayClocks`, 1 when unset (only `LinearToFloor` uses it).
    pub decay_clocks: u64,
    /// `collaborative.driftWindow`.
    pub drift_window: usize,
    /// `collaborative.neighbours`.
    pub neighbours: usize,
    /// `collaborative.metadataIntervalBatches`.
    pub metadata_interval: usize,
}

impl PolicyPlan {
    /// The plan of a SyncPolicy spec.
    pub fn new(spec: &SyncPolicySpec) -> Result<Self, PlanError> {
        let staleness = |field: &str, value: Option<i32>| at_least(field, value.unwrap_or(0), 0);
        let collaborative = &spec.collaborative;
        Ok(Self {
            intra_staleness: staleness(
                "spec.intraDatacenter.staleness",
                spec.intra_datacenter.staleness,
            )?,
            inter_staleness: staleness(
                "spec.interDatacenter.staleness",
                spec.inter_datacenter.staleness,
            )?,
            mirror_clock_bound: at_least("spec.mirrorClockBound", spec.mirror_clock_bound, 0)?,
            mirror_clock_period: at_least("spec.mirrorClockPeriod", spec.mirror_clock_period, 1)?,
            peer_timeout_seconds: at_least(
                "spec.interDatacenter.peerTimeoutSeconds",
                spec.inter_datacenter
                    .peer_timeout_seconds
                    .unwrap_or(DEFAULT_PEER_TIMEOUT_SECONDS),
                1,
            )?,
            round_clocks: at_least(
                "spec.federatedAveraging.roundClocks",
                spec.federated_averaging.round_clocks,
                1,
            )?,
            decay_clocks: at_least(
                "spec.significance.decayClocks",
                spec.significance.decay_clocks.unwrap_or(1),
                1,
            )?,
            drift_window: at_least(
                "spec.collaborative.driftWindow",
                collaborative.drift_window,
                1,
            )?,
            neighbours: at_least("spec.collaborative.neighbours", collaborative.neighbours, 1)?,
            metadata_interval: at_least(
                "spec.collaborative.metadataIntervalBatches",
                collaborative.metadata_interval_batches,
                1,
            )?,
        })
    }
}

/// A TrainingJob with its SyncPolicy, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobPlan {
    /// The job's datacenters, in the order it lists them.
    pub datacenters: Vec<DatacenterPlan>,
    /// `model.batchSize`: examples per mini-batch on each worker.
    pub batch_size: usize,
    /// `stopping.maxClocks`, if the job has a clock budget.
    pub max_clocks: Option<u64>,
    /// `checkpoint.intervalClocks`, or its default when the job sets no
    /// `checkpoint` (local runs checkpoint anyway).
    pub checkpoint_interval: u64,
    /// The SyncPolicy's numbers.
    pub policy: PolicyPlan,
}

impl JobPlan {
    /// The plan of a TrainingJob spec under a SyncPolicy spec.
    pub fn new(job: &TrainingJobSpec, policy: &SyncPolicySpec) -> Result<Self, PlanError> {
        let datacenters = job
            .datacenters
            .iter()
            .enumerate()
            .map(|(i, dc)| {
                let field = |name: &str| format!("spec.datacenters[{i}].{name}");
                Ok(DatacenterPlan {
                    name: dc.name.clone(),
                    shards: at_least(field("parameterServers"), dc.parameter_servers, 1)?,
                    workers: at_least(field("workers"), dc.workers, 1)?,
                })
            })
            .collect::<Result<_, PlanError>>()?;
        Ok(Self {
            datacenters,
            batch_size: at_least("spec.model.batchSize", job.model.batch_size, 1)?,
            max_clocks: job
                .stopping
                .max_clocks
                .map(|c| at_least("spec.stopping.maxClocks", c, 1))
                .transpose()?,
            checkpoint_interval: at_least(
                "spec.checkpoint.intervalClocks",
                job.checkpoint
                    .as_ref()
                    .map_or(DEFAULT_CHECKPOINT_INTERVAL_CLOCKS, |c| c.interval_clocks),
                1,
            )?,
            policy: PolicyPlan::new(policy)?,
        })
    }

    /// Shards in the whole job.
    #[must_use]
    pub fn total_shards(&self) -> usize {
        self.datacenters.iter().map(|d| d.shards).sum()
    }

    /// Workers in the whole job.
    #[must_use]
    pub fn total_workers(&self) -> usize {
        self.datacenters.iter().map(|d| d.workers).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> (TrainingJobSpec, SyncPolicySpec) {
        let job = crate::yaml::from_str(
            "syncPolicyRef: {name: p}\n\
             datacenters: [{name: a, parameterServers: 2, workers: 3}, {name: b}]\n\
             dataset: {name: Digits}\n\
             model: {kind: SoftmaxRegression}\n",
        )
        .unwrap();
        (job, crate::yaml::from_str("{}").unwrap())
    }

    #[test]
    fn defaults_are_resolved_once() {
        let (job, policy) = specs();
        let plan = JobPlan::new(&job, &policy).unwrap();
        assert_eq!(
            plan.datacenters
                .iter()
                .map(|d| (d.shards, d.workers))
                .collect::<Vec<_>>(),
            [(2, 3), (1, 1)]
        );
        assert_eq!((plan.total_shards(), plan.total_workers()), (3, 4));
        assert_eq!(plan.batch_size, 64);
        assert_eq!(plan.max_clocks, Some(100));
        assert_eq!(plan.checkpoint_interval, 10);
        assert_eq!(plan.policy.mirror_clock_period, 20);
        assert_eq!(plan.policy.peer_timeout_seconds, 30);
        assert_eq!(plan.policy.decay_clocks, 1);
    }

    #[test]
    fn unusable_values_name_their_field() {
        let (mut job, policy) = specs();
        job.datacenters[1].workers = 0;
        let e = JobPlan::new(&job, &policy).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.datacenters[1].workers: must be at least 1, got 0"
        );
        let (mut job, mut policy) = specs();
        job.model.batch_size = 5;
        policy.mirror_clock_period = -3;
        let e = JobPlan::new(&job, &policy).unwrap_err();
        assert_eq!(e.field, "spec.mirrorClockPeriod");
    }
}
