//! How a job ends: failed pods retried within `backoffLimit`, success
//! once the parameter servers (or every Cartel pod) finished, the deadline,
//! and, once finished, the final figures, `cleanPodPolicy` and
//! `ttlSecondsAfterFinished`.

use std::time::Duration;

use geoml_crds::TrainingJob;
use geoml_crds::training_job::CleanPodPolicy;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::build::{JobView, Placement, Role};
use super::objects::{delete_ignoring_missing, publish};
use super::{EXIT_GRACE, Outcome, finish_status, links, observe, sooner, status};
use crate::clusters::{Cluster, Unavailable};
use crate::{Context, Error};

/// Decides whether the running job ended: [`check_pods`], then the
/// deadline. Returns when to look again.
pub(super) async fn check(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    ctx: &Context,
    out: &mut Outcome,
) -> Result<Option<Duration>, Error> {
    if out.finished() {
        return Ok(None);
    }
    let requeue = check_pods(view, clusters, ctx, out).await?;
    let job = &view.job;
    let policy = &job.spec.run_policy;
    let (Some(limit), Some(start)) = (policy.active_deadline_seconds, &out.status.start_time)
    else {
        return Ok(requeue);
    };
    if out.finished() || policy.suspend {
        return Ok(requeue);
    }
    let elapsed = out.now.0.duration_since(start.0).as_secs();
    if elapsed < limit {
        let left = Duration::from_secs((limit - elapsed).unsigned_abs());
        return Ok(sooner(requeue, Some(left)));
    }
    out.condition(
        "Failed",
        true,
        "DeadlineExceeded",
        &format!("the job ran longer than activeDeadlineSeconds ({limit} s)"),
    );
    publish(
        ctx,
        job,
        EventType::Warning,
        "DeadlineExceeded",
        "activeDeadlineSeconds passed",
    )
    .await;
    Ok(requeue)
}

/// A finished job: its final figures (read before any pod is deleted),
/// `cleanPodPolicy`, and deletion after `ttlSecondsAfterFinished`.
pub(super) async fn wind_down(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    ctx: &Context,
    out: &mut Outcome,
) -> Result<Action, Error> {
    let job = &view.job;
    let failed = out.is("Failed");
    if out.status.completion_time.is_none() {
        out.status.completion_time = Some(out.now.clone());
        // The final figures, from the parameter servers' termination
        // messages, before any clean-up deletes the pods.
        observe::read_progress(view, clusters, out).await;
        links::publish_peers(ctx, &out.status.links, &out.now).await;
    }
    clean_pods(view, clusters, job.spec.run_policy.clean_pod_policy).await?;
    out.condition(
        "Running",
        false,
        if failed { "Failed" } else { "Succeeded" },
        "the job finished",
    );
    let mut requeue = None;
    if let Some(ttl) = job.spec.run_policy.ttl_seconds_after_finished {
        let done = out
            .status
            .completion_time
            .clone()
            .unwrap_or_else(|| out.now.clone());
        let since = out.now.0.duration_since(done.0).as_secs();
        if since >= i64::from(ttl) {
            finish_status(job, ctx, out).await?;
            let api = Api::<TrainingJob>::namespaced(
                ctx.client.clone(),
                &job.namespace().unwrap_or_default(),
            );
            api.delete(&job.name_any(), &DeleteParams::default())
                .await
                .map_err(Error::kube(
                    "deleting the job after ttlSecondsAfterFinished",
                ))?;
            return Ok(Action::await_change());
        }
        requeue = Some(Duration::from_secs((i64::from(ttl) - since).unsigned_abs()));
    }
    observe::observe(view, clusters, out);
    finish_status(job, ctx, out).await?;
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// Failed pods: deletes each (to be recreated) while retries stay within
/// `backoffLimit`, counting one retry per pod actually deleted; past the
/// limit the job fails. All parameter servers succeeded: the job succeeded,
/// once the other pods (the workers, told to stop) have exited or
/// [`EXIT_GRACE`] has passed; until then the returned delay asks to look again.
async fn check_pods(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    ctx: &Context,
    out: &mut Outcome,
) -> Result<Option<Duration>, Error> {
    let job = &view.job;
    // The pods whose exit ends training: the parameter servers, or every
    // Cartel pod (the sites and, in the first datacenter, the registry).
    let ends_training =
        |pod: &Pod| view.collaborative() || status::has_role(pod, Role::ParameterServer);
    let mut all_finished = true;
    // Pods other than the finishers that still run, and when the last
    // finisher ended.
    let mut exiting = false;
    let mut last_finish: Option<Time> = None;
    for (i, ((p, dc), cluster)) in view
        .placements
        .iter()
        .zip(&view.plan.datacenters)
        .zip(clusters)
        .enumerate()
    {
        let Ok(cluster) = cluster else {
            all_finished = false;
            continue;
        };
        let expected = if view.collaborative() {
            1 + usize::from(i == 0)
        } else {
            dc.shards
        };
        let pods = cluster.datacenter_pods(job, p.name());
        let finishers: Vec<_> = pods.iter().filter(|pod| ends_training(pod)).collect();
        all_finished &= finishers.len() == expected
            && finishers
                .iter()
                .all(|pod| status::phase(pod) == "Succeeded");
        exiting |= pods
            .iter()
            .any(|pod| !ends_training(pod) && !status::is_done(pod));
        last_finish = finishers
            .iter()
            .filter_map(|pod| status::finished_at(pod))
            .chain(last_finish)
            .max_by_key(|t| t.0);
        for pod in pods.iter().filter(|pod| {
            status::phase(pod) == "Failed" && pod.metadata.deletion_timestamp.is_none()
        }) {
            if !retry(view, p, cluster, pod, ctx, out).await? {
                return Ok(None);
            }
        }
    }
    if all_finished && exiting {
        let since = last_finish.map_or(Duration::ZERO, |t| {
            out.now.0.duration_since(t.0).unsigned_abs()
        });
        if let Some(left) = EXIT_GRACE.checked_sub(since) {
            return Ok(Some(left.max(Duration::from_secs(1))));
        }
    }
    if all_finished {
        let message = if view.collaborative() {
            "every site trained its whole stream and the registry finished"
        } else {
            "every parameter server finished: a stopping rule held"
        };
        out.condition("Succeeded", true, "StoppingRuleMet", message);
        publish(
            ctx,
            job,
            EventType::Normal,
            "Succeeded",
            "a stopping rule held",
        )
        .await;
    }
    Ok(None)
}

/// Deletes failed `pod` of datacenter `p`, to be recreated, if the backoff
/// limit allows; else fails the job. Returns whether the job goes on.
async fn retry(
    view: &JobView,
    p: &Placement,
    cluster: &Cluster,
    pod: &Pod,
    ctx: &Context,
    out: &mut Outcome,
) -> Result<bool, Error> {
    let job = &view.job;
    let limit = job.spec.run_policy.backoff_limit;
    let why = format!(
        "pod {} in datacenter {} failed: {}",
        pod.name_any(),
        p.name(),
        status::failure(pod)
    );
    if out.status.retries >= limit {
        out.condition(
            "Failed",
            true,
            "BackoffLimitExceeded",
            &format!(
                "{why}; backoffLimit {limit} reached after {} retries",
                out.status.retries
            ),
        );
        publish(ctx, job, EventType::Warning, "BackoffLimitExceeded", &why).await;
        return Ok(false);
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: pod.resource_version(),
        }),
        ..DeleteParams::default()
    };
    let api = Api::<Pod>::namespaced(cluster.client.clone(), &p.namespace);
    match api.delete(&pod.name_any(), &params).await {
        Ok(_) => {
            out.status.retries += 1;
            let note = format!(
                "{why}; recreating it (retry {} of {limit})",
                out.status.retries
            );
            publish(ctx, job, EventType::Warning, "PodFailed", &note).await;
        }
        // Already gone or changed: another reconciliation counted it.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => {
            return Err(Error::kube(format!(
                "deleting failed pod {}",
                pod.name_any()
            ))(e));
        }
    }
    Ok(true)
}

/// Deletes the job's pods in every reachable datacenter as `policy` says.
async fn clean_pods(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    policy: CleanPodPolicy,
) -> Result<(), Error> {
    if policy == CleanPodPolicy::None {
        return Ok(());
    }
    for (p, cluster) in view.placements.iter().zip(clusters) {
        let Ok(cluster) = cluster else { continue };
        let api = Api::<Pod>::namespaced(cluster.client.clone(), &p.namespace);
        for pod in cluster.job_pods(&view.job) {
            if (policy == CleanPodPolicy::All || !status::is_done(&pod))
                && pod.metadata.deletion_timestamp.is_none()
            {
                delete_ignoring_missing(&api, &pod.name_any()).await?;
            }
        }
    }
    Ok(())
}
