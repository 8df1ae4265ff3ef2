//! The TrainingJob controller. Each reconciliation is a pipeline, one
//! module per step:
//! [`resolve`] (SyncPolicy, Datacenters, their clusters; validation) →
//! [`finish`] (did it end: failed pods, success, deadline; winding down) →
//! [`certificates`] (the job's CA and its roles' TLS Secrets, or
//! cert-manager `Certificate`s for them) →
//! [`place`] ([`build`]'s pure objects, server-side applied in every
//! datacenter) → [`observe`] (pods and progress) → status.
//! A finalizer ([`cleanup`]) deletes the job's objects in every cluster
//! before the job goes.

pub mod build;
mod certificates;
mod cleanup;
mod finish;
mod links;
mod objects;
mod observe;
mod place;
pub mod progress;
mod resolve;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, future};
use geoml_crds::training_job::JobPhase;
use geoml_crds::{Datacenter, SyncPolicy, TrainingJob, TrainingJobStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::{Context, Error, conditions};

const CONTROLLER: &str = "trainingjob";
/// Finalizer that keeps a job until its objects are gone from every cluster.
pub const FINALIZER: &str = "geoml.io/cleanup";
/// `runPolicy.managedBy` value (or unset) that this operator reconciles.
pub const MANAGED_BY_VALUE: &str = "geoml.io/operator";
/// Wait before looking again for addresses that are not assigned yet.
const ENDPOINT_POLL: Duration = Duration::from_secs(5);

/// Condition of a job whose pods run while cert-manager has not (re)issued
/// every certificate; set only once that happened.
const CERTIFICATES_READY: &str = "CertificatesReady";
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
            Finalizer::Cleanup(job) => cleanup::cleanup(&job, &ctx).await,
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

impl Outcome {
    fn new(job: &TrainingJob) -> Self {
        let mut status = job.status.clone().unwrap_or_default();
        status.observed_generation = job.metadata.generation;
        Self {
            status,
            waiting: Vec::new(),
            now: Time(k8s_openapi::jiff::Timestamp::now()),
            generation: job.metadata.generation,
        }
    }

    /// Whether condition `type_` is true.
    fn is(&self, type_: &str) -> bool {
        conditions::is_true(&self.status.conditions, type_)
    }

    /// Whether the job succeeded or failed.
    fn finished(&self) -> bool {
        self.is("Succeeded") || self.is("Failed")
    }
}

/// The earlier of two requeue delays.
fn sooner(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// One reconciliation of a job that is not being deleted: the pipeline.
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
    let mut out = Outcome::new(job);

    let view = match resolve::view(job, ctx).await? {
        Ok(view) => view,
        Err(blocked) => {
            out.condition("Created", false, blocked.reason, &blocked.message);
            finish_status(job, ctx, &mut out).await?;
            // The Datacenter and SyncPolicy watches wake the job when the
            // missing object appears; nothing to retry before that.
            return Ok(Action::await_change());
        }
    };
    let clusters = resolve::clusters(&view, ctx);
    resolve::report_unavailable(&view, &clusters, &mut out);

    let ending = finish::check(&view, &clusters, ctx, &mut out).await?;
    if out.finished() {
        return finish::wind_down(&view, &clusters, ctx, &mut out).await;
    }
    let renewal = match certificates::step(&view, &clusters, &ctx.client).await? {
        certificates::Certificates::Current(renewal) => {
            if conditions::get(&out.status.conditions, CERTIFICATES_READY).is_some() {
                out.condition(
                    CERTIFICATES_READY,
                    true,
                    "Issued",
                    "every role's certificate is issued",
                );
            }
            renewal
        }
        certificates::Certificates::Pending(blocked) if !out.is("Created") => {
            // No pods without their certificates: they could not serve.
            out.condition("Created", false, blocked.reason, &blocked.message);
            finish_status(job, ctx, &mut out).await?;
            return Ok(Action::requeue(ENDPOINT_POLL));
        }
        certificates::Certificates::Pending(blocked) => {
            // The pods run on the certificates their Secrets hold (cert-manager
            // replaces one only with the next it issued): keep placing and
            // observing them, and say what the certificates wait for.
            out.condition(CERTIFICATES_READY, false, blocked.reason, &blocked.message);
            ENDPOINT_POLL
        }
    };
    let placing = place::step(&view, &clusters, ctx, &mut out).await?;
    let reading = observe::step(&view, &clusters, ctx, &mut out).await;
    finish_status(job, ctx, &mut out).await?;
    let requeue = sooner(sooner(sooner(ending, placing), reading), Some(renewal));
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
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
