//! Live SyncPolicy changes: what changed between two specs, which of it a
//! running shard can apply, and the watcher that re-reads the manifest file.
//!
//! The operator rewrites a job's manifest ConfigMap when a user edits its
//! SyncPolicy, and the kubelet swaps the mounted file. A shard re-reads it
//! every [`RELOAD_INTERVAL`]; what its mirror state holds (the significance
//! filter and WAN budget, the selective barrier, the mirror-clock bound and
//! period) applies at once, the rest (models, staleness, rounds, counts)
//! would need new processes and is logged and ignored.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use geoml_crds::plan::PolicyPlan;
use geoml_crds::{SyncPolicySpec, TrainingJobSpec};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::gaia::significance::Filter;
use crate::metrics::PsMetrics;
use crate::state::{Progress, State, lock, publish};
use geoml_crds::manifest::Manifest;

/// How often a running shard re-reads its manifest file.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What changed between two SyncPolicy specs, as a running shard sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyChange {
    /// The new significance filter, when it or the WAN budget
    /// (`wanBudgetMbps`, `wanBudgetShare`) changed.
    pub filter: Option<Filter>,
    /// The selective barrier switched on or off.
    pub selective_barrier: Option<bool>,
    /// A new mirror-clock bound DS.
    pub mirror_clock_bound: Option<u64>,
    /// A new mirror-clock period, in clocks.
    pub mirror_clock_period: Option<u64>,
    /// Fields that changed but cannot apply to running processes, as paths
    /// under the SyncPolicy's `spec`.
    pub ignored: Vec<&'static str>,
}

impl PolicyChange {
    /// Whether anything applies live.
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.filter.is_some()
            || self.selective_barrier.is_some()
            || self.mirror_clock_bound.is_some()
            || self.mirror_clock_period.is_some()
    }
}

/// What changed from `old` to `new`, whose checked numbers are `plan`.
#[must_use]
pub fn diff(old: &SyncPolicySpec, new: &SyncPolicySpec, plan: &PolicyPlan) -> PolicyChange {
    let mut change = PolicyChange::default();
    if old.significance != new.significance || old.wan_budget() != new.wan_budget() {
        change.filter = Some(Filter::new(
            &new.significance,
            new.wan_budget(),
            plan.decay_clocks,
        ));
    }
    if old.selective_barrier != new.selective_barrier {
        change.selective_barrier = Some(new.selective_barrier);
    }
    if old.mirror_clock_bound != new.mirror_clock_bound {
        change.mirror_clock_bound = Some(plan.mirror_clock_bound);
    }
    if old.mirror_clock_period != new.mirror_clock_period {
        change.mirror_clock_period = Some(plan.mirror_clock_period);
    }
    change.ignored = old.changes_needing_new_pods(new);
    change
}

/// The manifest's job and policy specs and the policy's checked numbers, or
/// why the text is not a usable manifest.
fn specs(text: &str) -> Result<(TrainingJobSpec, SyncPolicySpec, PolicyPlan), String> {
    let manifest = Manifest::from_yaml(text).map_err(|e| e.to_string())?;
    let job = manifest.job().map_err(|e| e.to_string())?;
    Ok((
        job.job.spec.clone(),
        job.sync_policy.spec.clone(),
        job.plan.policy,
    ))
}

/// A shard's view of its manifest file.
pub struct PolicyWatcher {
    /// The manifest file.
    pub path: PathBuf,
    /// Its text when last read.
    pub text: String,
    /// The specs in effect.
    pub job: TrainingJobSpec,
    /// The SyncPolicy in effect.
    pub policy: SyncPolicySpec,
}

impl PolicyWatcher {
    /// Watches `path`, whose text `text` describes the job running now.
    pub fn new(path: PathBuf, text: String) -> Result<Self, String> {
        let (job, policy, _) = specs(&text)?;
        Ok(Self {
            path,
            text,
            job,
            policy,
        })
    }

    /// Takes a new text of the file: the live part of a policy change, if
    /// any; `None` when the text is unchanged or unusable (logged, and the
    /// policy in effect stays).
    pub fn update(&mut self, text: String) -> Option<PolicyChange> {
        if text == self.text {
            return None;
        }
        // A half-written file differs again once complete: remember the
        // text so each version is judged once.
        self.text = text;
        let (job, policy, plan) = match specs(&self.text) {
            Ok(specs) => specs,
            Err(e) => {
                warn!(path = %self.path.display(), "manifest changed but is unusable ({e}); keeping the policy in effect");
                return None;
            }
        };
        if job != self.job {
            warn!(path = %self.path.display(), "the TrainingJob changed; a running job cannot take that (ignored)");
        }
        let change = diff(&self.policy, &policy, &plan);
        for field in &change.ignored {
            warn!(
                field,
                "SyncPolicy spec.{field} changed; a running job cannot take that (ignored)"
            );
        }
        self.job = job;
        self.policy = policy;
        change.is_live().then_some(change)
    }
}

/// Re-reads the watched file every `every` and applies live changes to the
/// shard's mirror state, waking readers and refreshing its metrics.
pub async fn watch(
    mut watcher: PolicyWatcher,
    state: Arc<Mutex<State>>,
    progress: Arc<watch::Sender<Progress>>,
    metrics: PsMetrics,
    every: Duration,
) {
    let mut unreadable = false;
    loop {
        tokio::time::sleep(every).await;
        let text = match tokio::fs::read_to_string(&watcher.path).await {
            Ok(text) => {
                unreadable = false;
                text
            }
            Err(e) => {
                if !unreadable {
                    warn!(path = %watcher.path.display(), "cannot read the manifest ({e}); keeping the policy in effect");
                }
                unreadable = true;
                continue;
            }
        };
        let Some(change) = watcher.update(text) else {
            continue;
        };
        let mut state = lock(&state);
        let Some(mirror) = state.mirror.as_mut() else {
            info!(
                ?change,
                "SyncPolicy changed; this mode has no mirrors to apply it to"
            );
            continue;
        };
        mirror.reconfigure(&change);
        metrics.observe_mirror(&mirror.status());
        info!(
            threshold = mirror.threshold(),
            ?change,
            "SyncPolicy change applied"
        );
        publish(&state, &progress);
    }
}

#[cfg(test)]
mod tests {
    use geoml_crds::sync_policy::{InterDatacenterModel, ThresholdSchedule};

    use super::*;

    fn spec() -> SyncPolicySpec {
        geoml_crds::yaml::from_str("{}").unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn diff_of(old: &SyncPolicySpec, new: &SyncPolicySpec) -> PolicyChange {
        let plan = PolicyPlan::new(new).unwrap_or_else(|e| unreachable!("{e}"));
        diff(old, new, &plan)
    }

    #[test]
    fn an_unchanged_policy_changes_nothing() {
        assert_eq!(diff_of(&spec(), &spec()), PolicyChange::default());
        assert!(!diff_of(&spec(), &spec()).is_live());
    }

    #[test]
    fn filter_barrier_and_mirror_clocks_apply_live() {
        let old = spec();
        let mut new = spec();
        new.significance.threshold = 0.3;
        new.significance.schedule = ThresholdSchedule::InverseSqrt;
        new.selective_barrier = !old.selective_barrier;
        new.mirror_clock_bound = 4;
        new.mirror_clock_period = 7;
        let change = diff_of(&old, &new);
        assert!(change.is_live());
        assert_eq!(
            change.filter,
            Some(Filter::new(&new.significance, new.wan_budget(), 1))
        );
        assert_eq!(change.selective_barrier, Some(new.selective_barrier));
        assert_eq!(change.mirror_clock_bound, Some(4));
        assert_eq!(change.mirror_clock_period, Some(7));
        assert!(change.ignored.is_empty());
        // A budget alone is a filter change too.
        let mut budget = spec();
        budget.wan_budget_mbps = Some(50.0);
        assert_eq!(
            diff_of(&old, &budget).filter,
            Some(Filter::new(&old.significance, budget.wan_budget(), 1))
        );
        let mut share = spec();
        share.wan_budget_share = Some(0.5);
        assert!(diff_of(&old, &share).filter.is_some());
    }

    #[test]
    fn models_and_rounds_are_ignored() {
        let old = spec();
        let mut new = spec();
        new.inter_datacenter.model = InterDatacenterModel::Ssp;
        new.inter_datacenter.staleness = Some(2);
        new.federated_averaging.round_clocks = 99;
        let change = diff_of(&old, &new);
        assert!(!change.is_live());
        assert_eq!(
            change.ignored,
            [
                "interDatacenter.model",
                "interDatacenter.staleness",
                "federatedAveraging"
            ]
        );
    }

    const MANIFEST: &str = "\
apiVersion: geoml.io/v1alpha1
kind: SyncPolicy
metadata: {name: p}
spec: {significance: {threshold: THRESHOLD}}
---
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {name: a}
spec: {region: r, cluster: {local: {}}}
---
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {name: j}
spec:
  syncPolicyRef: {name: p}
  model: {kind: SoftmaxRegression}
  dataset: {name: Digits}
  datacenters: [{name: a, parameterServers: 1, workers: 1}]
";

    fn manifest(threshold: f64) -> String {
        MANIFEST.replace("THRESHOLD", &threshold.to_string())
    }

    #[test]
    fn the_watcher_applies_each_new_text_once_and_survives_a_bad_one() {
        let mut w = PolicyWatcher::new(PathBuf::from("m.yaml"), manifest(0.1))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(w.update(manifest(0.1)), None, "same text");
        // Half-written: kept out, the old policy stays.
        let half = manifest(0.2)[..40].to_owned();
        assert_eq!(w.update(half), None);
        assert!((w.policy.significance.threshold - 0.1).abs() < 1e-12);
        let change = w.update(manifest(0.2));
        let threshold = change.and_then(|c| c.filter).map(|f| f.threshold());
        assert_eq!(threshold, Some(0.2));
        assert_eq!(w.update(manifest(0.2)), None);
    }
}
