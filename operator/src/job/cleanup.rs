//! The finalizer's cleanup: the job's objects deleted in every
//! datacenter's cluster before the job goes.

use geoml_crds::{Datacenter, TrainingJob};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::build::{self, Placement};
use super::certificates::forget_certificate;
use super::objects::{delete_ignoring_missing, delete_labelled, publish};
use crate::clusters::Cluster;
use crate::{Context, Error};

/// Cleanup: deletes the job's objects in every datacenter's cluster. A
/// datacenter that cannot be reached keeps the finalizer (and the job) until
/// it can; one whose Datacenter object is gone is skipped.
pub(super) async fn cleanup(job: &TrainingJob, ctx: &Context) -> Result<Action, Error> {
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
        // cert-manager's Certificates first, or it would write their
        // Secrets again.
        if job
            .spec
            .tls
            .as_ref()
            .is_some_and(|t| t.issuer_ref.is_some())
        {
            for role in build::Role::ALL {
                let name = build::names::tls(&job.name_any(), &spec.name, role);
                forget_certificate(&cluster, &p.namespace, &name).await?;
            }
        }
        // Secrets by name: the operator may not list them.
        let secrets = Api::<Secret>::namespaced(cluster.client.clone(), &p.namespace);
        for role in build::Role::ALL {
            let name = build::names::tls(&job.name_any(), &spec.name, role);
            delete_ignoring_missing(&secrets, &name).await?;
        }
    }
    let ca = Api::<Secret>::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    delete_ignoring_missing(&ca, &build::names::ca(&job.name_any())).await?;
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
