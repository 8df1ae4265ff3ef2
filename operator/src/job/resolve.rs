//! Dereference and validate: a job's SyncPolicy and Datacenters resolved
//! into a [`JobView`], the checks the CRD schema cannot make, and the
//! cluster of each datacenter.

use geoml_crds::{Datacenter, SyncPolicy, TrainingJob};
use kube::{Api, ResourceExt};

use super::Outcome;
use super::build::{self, JobView, Role, ViewError};
use crate::clusters::{Cluster, Unavailable};
use crate::{Context, Error};

/// A reason a job cannot be placed yet, and what to say about it.
pub(super) struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

/// The job resolved and validated, or why it cannot be placed yet.
pub(super) async fn view(
    job: &TrainingJob,
    ctx: &Context,
) -> Result<Result<JobView, Blocked>, Error> {
    Ok(dereference(job, ctx)
        .await?
        .and_then(|view| validate(&view).map(|()| view)))
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
    let api = Api::<Datacenter>::all(ctx.client.clone());
    let mut datacenters = Vec::new();
    for spec in &job.spec.datacenters {
        datacenters.extend(
            api.get_opt(&spec.name)
                .await
                .map_err(Error::kube(format!("reading Datacenter {}", spec.name)))?,
        );
    }
    Ok(JobView::new(
        job.clone(),
        policy,
        &datacenters,
        &ctx.settings.default_image,
    )
    .map_err(|e| match e {
        ViewError::MissingDatacenters(missing) => Blocked {
            reason: "DatacenterNotFound",
            message: format!(
                "spec.datacenters: no Datacenter named {}",
                missing.join(", ")
            ),
        },
        ViewError::Plan(e) => Blocked {
            reason: "InvalidSpec",
            message: e.to_string(),
        },
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
pub(super) fn clusters(view: &JobView, ctx: &Context) -> Vec<Result<Cluster, Unavailable>> {
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

/// The `DatacenterUnavailable` condition: which datacenters' clusters do
/// not answer, and why.
pub(super) fn report_unavailable(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    out: &mut Outcome,
) {
    let unavailable: Vec<String> = view
        .placements
        .iter()
        .zip(clusters)
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
}
