//! The TrainingJob controller. Each reconciliation is a pipeline:
//! [`dereference`] (SyncPolicy, Datacenters, their clusters) → validate →
//! [`build`] (pure) → server-side apply in every datacenter → status.
//! A finalizer deletes the job's objects in every cluster before the job goes.

pub mod build;
pub mod progress;
pub mod status;

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, future};
use geoml_crds::training_job::{CleanPodPolicy, DatacenterProgress, JobPhase};
use geoml_crds::{Datacenter, SyncPolicy, TrainingJob, TrainingJobStatus};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::json;

use self::build::{JobView, Placement, Role, SPEC_HASH_ANNOTATION};
use crate::clusters::{Cluster, Unavailable};
use crate::{Context, Error, conditions};

const CONTROLLER: &str = "trainingjob";
/// Finalizer that keeps a job until its objects are gone from every cluster.
pub const FINALIZER: &str = "geoml.io/cleanup";
/// `runPolicy.managedBy` value (or unset) that this operator reconciles.
pub const MANAGED_BY_VALUE: &str = "geoml.io/operator";
/// Wait before looking again for addresses that are not assigned yet.
const ENDPOINT_POLL: Duration = Duration::from_secs(5);
/// How long after the parameter servers finished the workers, told to stop,
/// may take to exit before the job is called finished anyway (and
/// `cleanPodPolicy: Running` deletes them).
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// Runs the controller until `shutdown` completes. Besides its own jobs it
/// watches Datacenters and SyncPolicies (mapped to the jobs that name them)
/// and pods in every cluster (through `wakeups`).
pub async fn run(
    ctx: Arc<Context>,
    wakeups: UnboundedReceiver<ObjectRef<TrainingJob>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (store, writer) = reflector::store();
    // Status writes do not wake a job: only spec changes, deletion and the
    // finalizer do (generation moves when deletion starts).
    let jobs = watcher(
        Api::<TrainingJob>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation.combine(predicates::finalizers),
        kube::runtime::PredicateConfig::default(),
    );
    let by_datacenter = store.clone();
    let by_policy = store.clone();
    Controller::for_stream(jobs, store)
        .watches(
            Api::<Datacenter>::all(client.clone()),
            watcher::Config::default(),
            move |dc| {
                jobs_naming(&by_datacenter, |job| {
                    job.spec.datacenters.iter().any(|d| d.name == dc.name_any())
                })
            },
        )
        .watches(
            Api::<SyncPolicy>::all(client),
            watcher::Config::default(),
            move |policy| {
                jobs_naming(&by_policy, |job| {
                    job.namespace() == policy.namespace()
                        && job.spec.sync_policy_ref.name == policy.name_any()
                })
            },
        )
        .reconcile_on(wakeups)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| future::ready(()))
        .await;
}

fn jobs_naming(
    store: &Store<TrainingJob>,
    names: impl Fn(&TrainingJob) -> bool,
) -> Vec<ObjectRef<TrainingJob>> {
    store
        .state()
        .iter()
        .filter(|job| names(job))
        .map(|job| ObjectRef::from_obj(job.as_ref()))
        .collect()
}

#[tracing::instrument(skip_all, fields(job = %job.name_any(), namespace = job.namespace()))]
async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    if job
        .spec
        .run_policy
        .managed_by
        .as_deref()
        .is_some_and(|m| m != MANAGED_BY_VALUE)
    {
        return Ok(Action::await_change());
    }
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let api = Api::<TrainingJob>::namespaced(ctx.client.clone(), &namespace);
    let action = finalizer(&api, FINALIZER, job, |event| async {
        match event {
            Finalizer::Apply(job) => apply(&job, &ctx).await,
            Finalizer::Cleanup(job) => cleanup(&job, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.reset_backoff(&key(&namespace, &name));
    Ok(action)
}

fn key(namespace: &str, name: &str) -> String {
    format!("trainingjob/{namespace}/{name}")
}

// kube-runtime hands the error policy owned `Arc`s.
#[allow(clippy::needless_pass_by_value)]
fn error_policy(job: Arc<TrainingJob>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job.name_any(), %error, "reconcile failed");
    ctx.metrics.failure(CONTROLLER, error.metric_label());
    Action::requeue(ctx.backoff(&key(&job.namespace().unwrap_or_default(), &job.name_any())))
}

/// A reason a job cannot be placed yet, and what to say about it.
struct Blocked {
    reason: &'static str,
    message: String,
}

/// Dereference: the job's SyncPolicy and Datacenters, resolved into a
/// [`JobView`], or why they cannot be.
async fn dereference(job: &TrainingJob, ctx: &Context) -> Result<Result<JobView, Blocked>, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let policy_name = &job.spec.sync_policy_ref.name;
    let policy = Api::<SyncPolicy>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(policy_name)
        .await
        .map_err(Error::kube(format!("reading SyncPolicy {policy_name}")))?;
    let Some(policy) = policy else {
        return Ok(Err(Blocked {
            reason: "SyncPolicyNotFound",
            message: format!(
                "spec.syncPolicyRef: SyncPolicy {namespace}/{policy_name} does not exist"
            ),
        }));
    };
    let datacenters = Api::<Datacenter>::all(ctx.client.clone());
    let mut placements = Vec::new();
    let mut missing = Vec::new();
    for spec in &job.spec.datacenters {
        match datacenters
            .get_opt(&spec.name)
            .await
            .map_err(Error::kube(format!("reading Datacenter {}", spec.name)))?
        {
            Some(dc) => placements.push(Placement::new(job, spec.clone(), dc)),
            None => missing.push(spec.name.clone()),
        }
    }
    if !missing.is_empty() {
        return Ok(Err(Blocked {
            reason: "DatacenterNotFound",
            message: format!(
                "spec.datacenters: no Datacenter named {}",
                missing.join(", ")
            ),
        }));
    }
    let image = job
        .spec
        .image
        .clone()
        .unwrap_or_else(|| ctx.settings.default_image.clone());
    Ok(Ok(JobView {
        job: job.clone(),
        policy,
        placements,
        image,
    }))
}

/// Validate: what the CRD schema cannot check. Object names must be valid
/// DNS labels (at most 63 characters).
fn validate(view: &JobView) -> Result<(), Blocked> {
    let job = view.job.name_any();
    for p in &view.placements {
        let longest = [
            build::names::pod(&job, p.name(), Role::Worker, p.spec.workers - 1),
            build::names::pod(
                &job,
                p.name(),
                Role::ParameterServer,
                p.spec.parameter_servers - 1,
            ),
            build::names::peer_service(&job, p.name(), p.spec.parameter_servers - 1),
            build::names::config_map(&job, p.name()),
        ]
        .into_iter()
        .max_by_key(String::len)
        .unwrap_or_default();
        if longest.len() > 63 {
            return Err(Blocked {
                reason: "NameTooLong",
                message: format!(
                    "object name {longest:?} is longer than 63 characters: shorten the job's or datacenter {}'s name",
                    p.name()
                ),
            });
        }
    }
    Ok(())
}

/// The cluster of each placement, or why it cannot be used.
fn clusters(view: &JobView, ctx: &Context) -> Vec<Result<Cluster, Unavailable>> {
    view.placements
        .iter()
        .map(|p| match ctx.clusters.get(p.name()) {
            Some(Ok(cluster)) => match &cluster.available {
                Ok(()) => Ok(cluster),
                Err(u) => Err(u.clone()),
            },
            Some(Err(u)) => Err(u),
            None => Err(Unavailable {
                reason: "NotConnected".to_owned(),
                message: "the operator has not connected to its cluster yet".to_owned(),
            }),
        })
        .collect()
}

/// Everything one reconciliation learns, turned into status at the end.
struct Outcome {
    status: TrainingJobStatus,
    /// Pods that do not run yet, and why, for the `Running` condition.
    waiting: Vec<String>,
    now: Time,
    generation: Option<i64>,
}

impl Outcome {
    fn condition(&mut self, type_: &str, value: bool, reason: &str, message: &str) {
        conditions::set(
            &mut self.status.conditions,
            type_,
            value,
            reason,
            message,
            self.generation,
            &self.now,
        );
    }
}

#[allow(clippy::too_many_lines)] // the pipeline reads best as one sequence of steps
async fn apply(cached: &TrainingJob, ctx: &Context) -> Result<Action, Error> {
    // The cache may lag behind this controller's last status write; counting
    // retries from a stale copy would lose some. Read the job itself.
    let api =
        Api::<TrainingJob>::namespaced(ctx.client.clone(), &cached.namespace().unwrap_or_default());
    let Some(job) = api
        .get_opt(&cached.name_any())
        .await
        .map_err(Error::kube("reading the job"))?
    else {
        return Ok(Action::await_change());
    };
    let job = &job;
    let mut out = Outcome {
        status: job.status.clone().unwrap_or_default(),
        waiting: Vec::new(),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
        generation: job.metadata.generation,
    };
    out.status.observed_generation = out.generation;

    // Dereference and validate.
    let view = match dereference(job, ctx).await? {
        Ok(view) => validate(&view).map(|()| view),
        Err(blocked) => Err(blocked),
    };
    let view = match view {
        Ok(view) => view,
        Err(blocked) => {
            out.condition("Created", false, blocked.reason, &blocked.message);
            finish_status(job, ctx, &mut out).await?;
            // The Datacenter and SyncPolicy watches wake the job when the
            // missing object appears; nothing to retry before that.
            return Ok(Action::await_change());
        }
    };
    let clusters = clusters(&view, ctx);
    let unavailable: Vec<String> = view
        .placements
        .iter()
        .zip(&clusters)
        .filter_map(|(p, c)| {
            c.as_ref()
                .err()
                .map(|u| format!("Datacenter {}: {}: {}", p.name(), u.reason, u.message))
        })
        .collect();
    match clusters.iter().find_map(|c| c.as_ref().err()) {
        Some(first) => out.condition(
            "DatacenterUnavailable",
            true,
            &first.reason,
            &unavailable.join("; "),
        ),
        None => out.condition(
            "DatacenterUnavailable",
            false,
            "AllDatacentersActive",
            "every datacenter's cluster answers",
        ),
    }

    let finished = conditions::is_true(&out.status.conditions, "Succeeded")
        || conditions::is_true(&out.status.conditions, "Failed");
    let mut requeue: Option<Duration> = None;

    // Failed pods: recreate them while the backoff limit allows.
    if !finished {
        requeue = check_pods(&view, &clusters, ctx, &mut out).await?;
    }
    // Deadline.
    let finished = conditions::is_true(&out.status.conditions, "Succeeded")
        || conditions::is_true(&out.status.conditions, "Failed");
    if !finished
        && !job.spec.run_policy.suspend
        && let (Some(limit), Some(start)) = (
            job.spec.run_policy.active_deadline_seconds,
            &out.status.start_time,
        )
    {
        {
            let elapsed = out.now.0.duration_since(start.0).as_secs();
            if elapsed >= limit {
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
            } else {
                let left = Duration::from_secs((limit - elapsed).unsigned_abs());
                requeue = Some(requeue.map_or(left, |r| r.min(left)));
            }
        }
    }
    let failed = conditions::is_true(&out.status.conditions, "Failed");
    let succeeded = conditions::is_true(&out.status.conditions, "Succeeded");

    if failed || succeeded {
        if out.status.completion_time.is_none() {
            out.status.completion_time = Some(out.now.clone());
            // The final figures, from the parameter servers' termination
            // messages, before any clean-up deletes the pods.
            read_progress(&view, &clusters, &mut out).await;
        }
        clean_pods(&view, &clusters, job.spec.run_policy.clean_pod_policy).await?;
        out.condition(
            "Running",
            false,
            if failed { "Failed" } else { "Succeeded" },
            "the job finished",
        );
        if let Some(ttl) = job.spec.run_policy.ttl_seconds_after_finished {
            let done = out
                .status
                .completion_time
                .clone()
                .unwrap_or_else(|| out.now.clone());
            let since = out.now.0.duration_since(done.0).as_secs();
            if since >= i64::from(ttl) {
                finish_status(job, ctx, &mut out).await?;
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
        observe(&view, &clusters, &mut out);
        finish_status(job, ctx, &mut out).await?;
        return Ok(requeue.map_or_else(Action::await_change, Action::requeue));
    }

    // Build and apply, datacenter by datacenter.
    let suspended = job.spec.run_policy.suspend;
    let mut refused = Vec::new();
    let created = place(&view, &clusters, suspended, &mut refused).await?;
    refused.sort_unstable();
    refused.dedup();
    if refused.is_empty() {
        out.condition(
            "SyncPolicyChangeRefused",
            false,
            "SyncPolicyApplied",
            "running pods follow the SyncPolicy",
        );
    } else {
        out.condition(
            "SyncPolicyChangeRefused",
            true,
            "NeedsNewPods",
            &format!(
                "SyncPolicy {} changed {} while the job runs; running pods cannot take that and keep the old values (re-create the job to use them)",
                view.policy.name_any(),
                refused.join(", ")
            ),
        );
    }
    match &created {
        Ok(count) => out.condition(
            "Created",
            true,
            "ObjectsCreated",
            &format!("{count} objects in {} datacenters", view.placements.len()),
        ),
        Err(blocked) => {
            out.condition("Created", false, blocked.reason, &blocked.message);
            requeue = Some(ENDPOINT_POLL);
        }
    }
    if suspended {
        if !conditions::is_true(&out.status.conditions, "Suspended") {
            publish(
                ctx,
                job,
                EventType::Normal,
                "Suspended",
                "runPolicy.suspend is true: pods deleted",
            )
            .await;
        }
        out.condition(
            "Suspended",
            true,
            "Suspended",
            "runPolicy.suspend is true: the job's pods are deleted",
        );
        out.condition("Running", false, "Suspended", "the job is suspended");
        out.status.start_time = None;
    } else {
        if conditions::is_true(&out.status.conditions, "Suspended") {
            out.condition(
                "Suspended",
                false,
                "Resumed",
                "runPolicy.suspend is false again",
            );
            publish(ctx, job, EventType::Normal, "Resumed", "pods recreated").await;
        }
        if created.is_ok() && out.status.start_time.is_none() {
            out.status.start_time = Some(out.now.clone());
        }
    }
    let all_running = observe(&view, &clusters, &mut out);
    if all_running && !suspended {
        out.condition(
            "Running",
            true,
            "AllPodsRunning",
            "every parameter server and worker runs",
        );
        read_progress(&view, &clusters, &mut out).await;
        requeue = Some(requeue.map_or(ctx.settings.progress_interval, |r| {
            r.min(ctx.settings.progress_interval)
        }));
    } else if !suspended {
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
    finish_status(job, ctx, &mut out).await?;
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

fn pod_totals(per_dc: &[DatacenterProgress]) -> (i32, i32) {
    per_dc.iter().fold((0, 0), |(r, t), dc| {
        (
            r + dc.parameter_servers.ready + dc.workers.ready,
            t + dc.parameter_servers.desired + dc.workers.desired,
        )
    })
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
    let limit = job.spec.run_policy.backoff_limit;
    // The pods whose exit ends training: the parameter servers, or every
    // Cartel pod (the sites and, in the first datacenter, the registry).
    let ends_training =
        |pod: &Pod| view.collaborative() || status::has_role(pod, Role::ParameterServer);
    let mut all_finished = true;
    // Pods other than the finishers that still run, and when the last
    // finisher ended.
    let mut exiting = false;
    let mut last_finish: Option<Time> = None;
    for (i, (p, cluster)) in view.placements.iter().zip(clusters).enumerate() {
        let Ok(cluster) = cluster else {
            all_finished = false;
            continue;
        };
        let expected = if view.collaborative() {
            1 + usize::from(i == 0)
        } else {
            usize::try_from(p.spec.parameter_servers).unwrap_or(0)
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
                return Ok(None);
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

/// Build and apply: Services first (their addresses are the mirror
/// endpoints), then, once every datacenter's endpoints are known, the
/// topology ConfigMaps, the registry and the pods. Returns how many objects
/// the job has, or why they cannot all be created yet.
async fn place(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    suspended: bool,
    refused: &mut Vec<&'static str>,
) -> Result<Result<usize, Blocked>, Error> {
    let mut objects = 0;
    let mut endpoints = build::Endpoints::default();
    let mut pending: Vec<String> = Vec::new();
    let mut down: Vec<String> = Vec::new();
    for (i, (p, cluster)) in view.placements.iter().zip(clusters).enumerate() {
        let Ok(cluster) = cluster else {
            down.push(p.name().to_owned());
            endpoints.local.push(Vec::new());
            endpoints.peer.push(Vec::new());
            endpoints.sites.push(String::new());
            continue;
        };
        objects += place_services(view, i, &cluster.client, &mut endpoints, &mut pending).await?;
    }
    if !down.is_empty() {
        return Ok(Err(Blocked {
            reason: "DatacenterUnavailable",
            message: format!(
                "cannot create objects in unavailable datacenters: {}",
                down.join(", ")
            ),
        }));
    }
    if !pending.is_empty() {
        return Ok(Err(Blocked {
            reason: "WaitingForMirrorEndpoints",
            message: format!("no address assigned yet to Service {}", pending.join(", ")),
        }));
    }
    let manifest = view.manifest_yaml()?;
    for (i, (p, cluster)) in view.placements.iter().zip(clusters).enumerate() {
        let Ok(cluster) = cluster else { continue };
        let topology = view.topology(i, &endpoints);
        // Running pods keep a manifest whose SyncPolicy they cannot follow.
        let mounted = mounted_manifest(cluster, view, p).await?;
        let changed = mounted
            .as_ref()
            .map(|(policy, _)| policy.changes_needing_new_pods(&view.policy.spec));
        let manifest = match (changed, mounted) {
            (Some(fields), Some((_, text)))
                if !fields.is_empty()
                    && !cluster.datacenter_pods(&view.job, p.name()).is_empty() =>
            {
                refused.extend(fields);
                text
            }
            _ => manifest.clone(),
        };
        apply_object(
            &cluster.client,
            &p.namespace,
            &view.config_map(i, &manifest, &topology)?,
        )
        .await?;
        objects += 1;
        let site = endpoints.sites.get(i).map_or("", String::as_str);
        objects += sync_pods(view, p, site, cluster, suspended).await?;
    }
    Ok(Ok(objects))
}

/// The SyncPolicy spec in datacenter `p`'s mounted manifest and the
/// manifest's text, if its ConfigMap exists.
async fn mounted_manifest(
    cluster: &Cluster,
    view: &JobView,
    p: &Placement,
) -> Result<Option<(geoml_crds::SyncPolicySpec, String)>, Error> {
    let api = Api::<ConfigMap>::namespaced(cluster.client.clone(), &p.namespace);
    let name = build::names::config_map(&view.job.name_any(), p.name());
    let Some(map) = api
        .get_opt(&name)
        .await
        .map_err(Error::kube(format!("reading ConfigMap {name}")))?
    else {
        return Ok(None);
    };
    let Some(text) = map.data.and_then(|mut d| d.remove("manifest.yaml")) else {
        return Ok(None);
    };
    let policy = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
        .find(|doc| doc["kind"] == "SyncPolicy")
        .and_then(|doc| serde_yaml::from_value::<SyncPolicy>(doc).ok());
    Ok(policy.map(|p| (p.spec, text)))
}

/// Applies datacenter number `i`'s Services (and checkpoint claim) and
/// records where they are reached in `endpoints`, or in `pending` those
/// without an address yet. Returns how many objects it applied.
async fn place_services(
    view: &JobView,
    i: usize,
    client: &Client,
    endpoints: &mut build::Endpoints,
    pending: &mut Vec<String>,
) -> Result<usize, Error> {
    let p = &view.placements[i];
    if !p.owned {
        ensure_namespace(client, &p.namespace).await?;
    }
    apply_object(client, &p.namespace, &view.headless_service(p)).await?;
    let mut objects = 1;
    if let Some(claim) = view.checkpoint_pvc(p) {
        apply_object(client, &p.namespace, &claim).await?;
        objects += 1;
    }
    let access = &p.datacenter.spec.peer_access;
    let node = node_address(client, access).await?;
    // Inside its own cluster and from the others; with one datacenter, the
    // same address.
    let urls = |applied: &Service, offset: i32| {
        let local = build::local_url(applied)?;
        let peer = if view.placements.len() > 1 {
            build::peer_url(access, applied, node.as_deref(), offset)?
        } else {
            local.clone()
        };
        Some((local, peer))
    };
    let mut apply =
        async |service: Service, offset: i32| -> Result<Option<(String, String)>, Error> {
            let applied = apply_object(client, &p.namespace, &service).await?;
            objects += 1;
            let found = urls(&applied, offset);
            if found.is_none() {
                pending.push(format!("{}/{}", p.name(), applied.name_any()));
            }
            Ok(found)
        };
    let (mut local, mut peer) = (Vec::new(), Vec::new());
    let shards = view.peer_services(p);
    let count = i32::try_from(shards.len()).unwrap_or(i32::MAX);
    for (offset, service) in (0..).zip(shards) {
        if let Some((l, r)) = apply(service, offset).await? {
            local.push(l);
            peer.push(r);
        }
    }
    // Cartel: the site's Service (gateway port after the shards'), and the
    // registry's in the first datacenter.
    let mut site = String::new();
    if view.collaborative() {
        if let Some((_, r)) = apply(view.site_service(p), count).await? {
            site = r;
        }
        if i == 0 {
            endpoints.registry = apply(view.registry_service(p), count + 1).await?;
        }
    }
    endpoints.sites.push(site);
    endpoints.local.push(local);
    endpoints.peer.push(peer);
    Ok(objects)
}

/// Makes the datacenter's pods what the job asks for: creates missing ones,
/// replaces those whose spec changed, deletes extra ones (or all of them
/// while suspended). Returns how many pods the job wants there.
async fn sync_pods(
    view: &JobView,
    p: &Placement,
    site_url: &str,
    cluster: &Cluster,
    suspended: bool,
) -> Result<usize, Error> {
    let desired = if suspended {
        Vec::new()
    } else {
        view.pods(p, site_url)
    };
    let existing = cluster.datacenter_pods(&view.job, p.name());
    tracing::debug!(
        datacenter = p.name(),
        desired = desired.len(),
        cached = existing.len(),
        "syncing pods"
    );
    let api = Api::<Pod>::namespaced(cluster.client.clone(), &p.namespace);
    let wanted: BTreeSet<String> = desired.iter().map(ResourceExt::name_any).collect();
    for pod in &existing {
        let stale = desired
            .iter()
            .find(|d| d.name_any() == pod.name_any())
            .is_some_and(|d| {
                d.annotations().get(SPEC_HASH_ANNOTATION)
                    != pod.annotations().get(SPEC_HASH_ANNOTATION)
            });
        if (stale || !wanted.contains(&pod.name_any())) && pod.metadata.deletion_timestamp.is_none()
        {
            delete_ignoring_missing(&api, &pod.name_any()).await?;
        }
    }
    let present: BTreeSet<String> = existing.iter().map(|pod| pod.name_any()).collect();
    for pod in &desired {
        if !present.contains(&pod.name_any()) {
            apply_object(&cluster.client, &p.namespace, pod).await?;
        }
    }
    Ok(desired.len())
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
            let done = matches!(status::phase(&pod), "Succeeded" | "Failed");
            if (policy == CleanPodPolicy::All || !done) && pod.metadata.deletion_timestamp.is_none()
            {
                delete_ignoring_missing(&api, &pod.name_any()).await?;
            }
        }
    }
    Ok(())
}

/// Status from the cached pods: replica counts per datacenter and
/// `datacentersReady`. Returns whether every pod the job wants runs.
fn observe(view: &JobView, clusters: &[Result<Cluster, Unavailable>], out: &mut Outcome) -> bool {
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
/// mean of the shards' metrics and the WAN bytes sent.
async fn read_progress(
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
        let sent: Vec<i64> = shards.iter().filter_map(|s| s.wan_sent_bytes).collect();
        if !sent.is_empty() {
            progress.wan_bytes_sent = Some(sent.iter().sum());
        }
        let updated: f64 = shards.iter().filter_map(|s| s.elements_updated).sum();
        if updated > 0.0 {
            let sent: f64 = shards.iter().filter_map(|s| s.elements_sent).sum();
            progress.updates_sent_fraction = Some(sent / updated);
        }
        metrics.extend(shards.iter().filter_map(|s| s.metric));
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
    if !metrics.is_empty() {
        // A handful of shards: the count fits an f64 exactly.
        #[allow(clippy::cast_precision_loss)]
        let mean = metrics.iter().sum::<f64>() / metrics.len() as f64;
        out.status.metric = Some(mean);
    }
}

/// Phase and reason from the conditions, then a server-side apply of the
/// status (a no-op for the apiserver when nothing changed).
async fn finish_status(job: &TrainingJob, ctx: &Context, out: &mut Outcome) -> Result<(), Error> {
    let cs = &out.status.conditions;
    let reason_of = |t: &str| conditions::get(cs, t).map(|c| c.reason.clone());
    let (phase, reason) = if conditions::is_true(cs, "Failed") {
        (JobPhase::Failed, reason_of("Failed"))
    } else if conditions::is_true(cs, "Succeeded") {
        (JobPhase::Succeeded, reason_of("Succeeded"))
    } else if conditions::is_true(cs, "Suspended") {
        (JobPhase::Suspended, reason_of("Suspended"))
    } else if conditions::is_true(cs, "Running") {
        (JobPhase::Running, reason_of("Running"))
    } else if conditions::is_true(cs, "DatacenterUnavailable") {
        (JobPhase::Pending, reason_of("DatacenterUnavailable"))
    } else if conditions::get(cs, "Created").is_some_and(|c| c.status == "False") {
        (JobPhase::Pending, reason_of("Created"))
    } else {
        (JobPhase::Pending, reason_of("Running"))
    };
    out.status.phase = Some(phase);
    out.status.reason = reason;
    if job.status.as_ref() == Some(&out.status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "geoml.io/v1alpha1",
        "kind": "TrainingJob",
        "status": out.status,
    });
    Api::<TrainingJob>::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default())
        .patch_status(
            &job.name_any(),
            &PatchParams::apply(build::MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(Error::kube("writing the job's status"))?;
    Ok(())
}

/// Cleanup: deletes the job's objects in every datacenter's cluster. A
/// datacenter that cannot be reached keeps the finalizer (and the job) until
/// it can; one whose Datacenter object is gone is skipped.
async fn cleanup(job: &TrainingJob, ctx: &Context) -> Result<Action, Error> {
    let selector = format!(
        "{}={},{}={}",
        build::JOB_LABEL,
        job.name_any(),
        build::JOB_NAMESPACE_LABEL,
        job.namespace().unwrap_or_default()
    );
    for spec in &job.spec.datacenters {
        let Some(dc) = Api::<Datacenter>::all(ctx.client.clone())
            .get_opt(&spec.name)
            .await
            .map_err(Error::kube(format!("reading Datacenter {}", spec.name)))?
        else {
            continue;
        };
        let p = Placement::new(job, spec.clone(), dc);
        let cluster = match ctx.clusters.get(&spec.name) {
            Some(Ok(c)) if c.available.is_ok() => c,
            // Without usable credentials nothing can ever be deleted there:
            // say so instead of keeping the job forever.
            Some(Err(u)) if u.reason != "KubeconfigSecretUnreadable" => {
                let note = format!(
                    "objects in datacenter {} may remain: {}: {}",
                    spec.name, u.reason, u.message
                );
                publish(ctx, job, EventType::Warning, "CleanupSkipped", &note).await;
                continue;
            }
            Some(
                Ok(Cluster {
                    available: Err(u), ..
                })
                | Err(u),
            ) => {
                return Err(Error::CleanupBlocked {
                    datacenter: spec.name.clone(),
                    reason: u.message,
                });
            }
            _ => {
                return Err(Error::CleanupBlocked {
                    datacenter: spec.name.clone(),
                    reason: "not connected yet".to_owned(),
                });
            }
        };
        delete_labelled::<Pod>(&cluster.client, &p.namespace, &selector).await?;
        delete_labelled::<Service>(&cluster.client, &p.namespace, &selector).await?;
        delete_labelled::<ConfigMap>(&cluster.client, &p.namespace, &selector).await?;
        delete_labelled::<PersistentVolumeClaim>(&cluster.client, &p.namespace, &selector).await?;
    }
    publish(
        ctx,
        job,
        EventType::Normal,
        "Deleted",
        "objects deleted in every datacenter",
    )
    .await;
    Ok(Action::await_change())
}

/// Server-side apply of `object` with the operator's field manager.
async fn apply_object<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = object.name_any();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(build::MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(Error::kube(format!(
            "applying {} {namespace}/{name}",
            K::kind(&())
        )))
}

async fn ensure_namespace(client: &Client, name: &str) -> Result<(), Error> {
    let api = Api::<Namespace>::all(client.clone());
    if api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading namespace {name}")))?
        .is_some()
    {
        return Ok(());
    }
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Namespace::default()
    };
    api.patch(
        name,
        &PatchParams::apply(build::MANAGER),
        &Patch::Apply(&namespace),
    )
    .await
    .map_err(Error::kube(format!("creating namespace {name}")))?;
    Ok(())
}

/// A node address for NodePort peer Services: the first node's external
/// IP, else its internal IP. None for other Service types or without nodes.
async fn node_address(
    client: &Client,
    access: &geoml_crds::datacenter::PeerAccess,
) -> Result<Option<String>, Error> {
    if access.gateway_address.is_some()
        || access.service_type != geoml_crds::datacenter::PeerServiceType::NodePort
    {
        return Ok(None);
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .map_err(Error::kube("listing nodes for NodePort addresses"))?;
    let addresses: Vec<_> = nodes
        .items
        .iter()
        .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
        .collect();
    Ok(["ExternalIP", "InternalIP"]
        .iter()
        .find_map(|t| addresses.iter().find(|a| a.type_ == *t))
        .map(|a| a.address.clone()))
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("deleting {} {name}", K::kind(&())))(e)),
    }
}

async fn delete_labelled<K>(client: &Client, namespace: &str, selector: &str) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let list = api
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map_err(Error::kube(format!("listing {} to delete", K::kind(&()))))?;
    for item in list.items {
        delete_ignoring_missing(&api, &item.name_any()).await?;
    }
    Ok(())
}

async fn publish(ctx: &Context, job: &TrainingJob, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        tracing::warn!(%error, "publishing an event");
    }
}
