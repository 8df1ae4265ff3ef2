//! Status from the pods: replica counts per datacenter, the `Running`
//! condition, and progress (clock, metric, WAN bytes) read from the
//! parameter servers.

use std::sync::Arc;
use std::time::Duration;

use futures::future;
use geoml_crds::training_job::DatacenterProgress;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::build::{self, JobView, Role};
use super::progress::{self, ShardProgress};
use super::{Outcome, links, status};
use crate::Context;
use crate::clusters::{Cluster, Unavailable};

/// Observes the pods and sets `Running`; while everything runs, reads the
/// progress and returns the operator's `progress_interval`, when to read it again.
pub(super) async fn step(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    ctx: &Context,
    out: &mut Outcome,
) -> Option<Duration> {
    let suspended = view.job.spec.run_policy.suspend;
    let all_running = observe(view, clusters, out);
    if all_running && !suspended {
        out.condition(
            "Running",
            true,
            "AllPodsRunning",
            "every parameter server and worker runs",
        );
        read_progress(view, clusters, out).await;
        links::publish_peers(ctx, &out.status.links, &out.now).await;
        return Some(ctx.settings.progress_interval);
    }
    if !suspended {
        let (ready, total) = pod_totals(&out.status.per_datacenter);
        let shown: Vec<&str> = out.waiting.iter().take(3).map(String::as_str).collect();
        let more = out.waiting.len().saturating_sub(shown.len());
        let message = match (shown.is_empty(), more) {
            (true, _) => format!("{ready}/{total} pods ready"),
            (false, 0) => format!(
                "{ready}/{total} pods ready; not ready: {}",
                shown.join(", ")
            ),
            (false, more) => format!(
                "{ready}/{total} pods ready; not ready: {} and {more} more",
                shown.join(", ")
            ),
        };
        out.condition("Running", false, "PodsNotReady", &message);
    }
    None
}

fn pod_totals(per_dc: &[DatacenterProgress]) -> (i32, i32) {
    per_dc.iter().fold((0, 0), |(r, t), dc| {
        (
            r + dc.parameter_servers.ready + dc.workers.ready,
            t + dc.parameter_servers.desired + dc.workers.desired,
        )
    })
}

/// Status from the cached pods: replica counts per datacenter and
/// `datacentersReady`. Returns whether every pod the job wants runs.
pub(super) fn observe(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    out: &mut Outcome,
) -> bool {
    let old = std::mem::take(&mut out.status.per_datacenter);
    let mut ready_dcs = 0;
    for (p, cluster) in view.placements.iter().zip(clusters) {
        let pods: Vec<Arc<Pod>> = match cluster {
            Ok(c) => c.datacenter_pods(&view.job, p.name()),
            Err(_) => Vec::new(),
        };
        out.waiting
            .extend(pods.iter().filter(|pod| !status::is_ready(pod)).map(|pod| {
                format!(
                    "{} in {} ({})",
                    pod.name_any(),
                    p.name(),
                    status::waiting(pod)
                )
            }));
        let previous = old.iter().find(|d| d.name == p.name());
        let progress = DatacenterProgress {
            name: p.name().to_owned(),
            parameter_servers: status::counts(
                pods.iter().map(AsRef::as_ref),
                Role::ParameterServer,
                if view.collaborative() {
                    0
                } else {
                    p.spec.parameter_servers
                },
            ),
            workers: if view.collaborative() {
                status::counts(pods.iter().map(AsRef::as_ref), Role::Site, 1)
            } else {
                status::counts(pods.iter().map(AsRef::as_ref), Role::Worker, p.spec.workers)
            },
            clock: previous.and_then(|d| d.clock),
            wan_bytes_sent: previous.and_then(|d| d.wan_bytes_sent),
            updates_sent_fraction: previous.and_then(|d| d.updates_sent_fraction),
        };
        if progress.parameter_servers.ready == progress.parameter_servers.desired
            && progress.workers.ready == progress.workers.desired
        {
            ready_dcs += 1;
        }
        out.status.per_datacenter.push(progress);
    }
    let total = view.placements.len();
    out.status.datacenters_ready = Some(format!("{ready_dcs}/{total}"));
    ready_dcs == total
}

/// Progress read from every running parameter server: each datacenter's
/// clock (its slowest shard), the job's clock (the slowest datacenter), the
/// mean over datacenters of their latest evaluation, the WAN bytes sent and
/// the traffic per link.
pub(super) async fn read_progress(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    out: &mut Outcome,
) {
    out.status.metric_name = Some(view.job.spec.model.kind.metric_name().to_owned());
    let mut metrics = Vec::new();
    for ((p, cluster), progress) in view
        .placements
        .iter()
        .zip(clusters)
        .zip(&mut out.status.per_datacenter)
    {
        let Ok(cluster) = cluster else { continue };
        let ps: Vec<Arc<Pod>> = cluster
            .job_pods(&view.job)
            .into_iter()
            .filter(|pod| {
                status::has_role(pod, Role::ParameterServer)
                    && pod
                        .labels()
                        .get(build::DATACENTER_LABEL)
                        .map(String::as_str)
                        == Some(p.name())
            })
            .collect();
        let shards =
            future::join_all(ps.iter().map(|pod| progress::read(&cluster.client, pod))).await;
        let shards: Vec<_> = shards.into_iter().flatten().collect();
        if let Some(clock) = shards.iter().filter_map(|s| s.clock).min() {
            progress.clock = Some(clock);
        }
        let sent: Vec<i64> = shards.iter().filter_map(ShardProgress::wan_bytes).collect();
        if !sent.is_empty() {
            progress.wan_bytes_sent = Some(sent.iter().sum());
        }
        if !shards.is_empty() {
            let price = p
                .datacenter
                .spec
                .wan
                .as_ref()
                .and_then(|w| w.egress_cost_per_gib);
            out.status.links.retain(|l| l.from != p.name());
            out.status
                .links
                .extend(links::aggregate(p.name(), price, &shards));
        }
        let updated: f64 = shards.iter().filter_map(|s| s.elements_updated).sum();
        if updated > 0.0 {
            let sent: f64 = shards.iter().filter_map(|s| s.elements_sent).sum();
            progress.updates_sent_fraction = Some(sent / updated);
        }
        // Every shard of a datacenter hears the same evaluations: the
        // latest one is the datacenter's.
        if let Some((_, metric)) = shards
            .iter()
            .filter_map(ShardProgress::evaluation)
            .max_by_key(|&(clock, _)| clock)
        {
            metrics.push(metric);
        }
    }
    if let Some(clock) = out
        .status
        .per_datacenter
        .iter()
        .map(|d| d.clock)
        .collect::<Option<Vec<_>>>()
        .and_then(|c| c.into_iter().min())
    {
        out.status.clock = Some(clock);
    }
    let sent: Vec<i64> = out
        .status
        .per_datacenter
        .iter()
        .filter_map(|d| d.wan_bytes_sent)
        .collect();
    if !sent.is_empty() {
        out.status.wan_bytes = Some(sent.iter().sum());
    }
    out.status.egress_cost = links::total_cost(&out.status.links);
    if !metrics.is_empty() {
        // A handful of shards: the count fits an f64 exactly.
        #[allow(clippy::cast_precision_loss)]
        let mean = metrics.iter().sum::<f64>() / metrics.len() as f64;
        out.status.metric = Some(mean);
    }
}
