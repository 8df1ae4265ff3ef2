//! Writes to the clusters: server-side apply, deletion, namespaces and
//! events.

use std::fmt::Debug;

use geoml_crds::TrainingJob;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build;
use crate::{Context, Error};

/// Server-side apply of `object` with the operator's field manager.
pub(super) async fn apply_object<K>(
    client: &Client,
    namespace: &str,
    object: &K,
) -> Result<K, Error>
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

/// Creates namespace `name` unless it exists.
pub(super) async fn ensure_namespace(client: &Client, name: &str) -> Result<(), Error> {
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

/// Deletes `name`; one already gone is fine.
pub(super) async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("deleting {} {name}", K::kind(&())))(e)),
    }
}

/// Deletes every object of kind `K` that `selector` matches.
pub(super) async fn delete_labelled<K>(
    client: &Client,
    namespace: &str,
    selector: &str,
) -> Result<(), Error>
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

/// Publishes an event about `job`; failing to is logged, not an error.
pub(super) async fn publish(
    ctx: &Context,
    job: &TrainingJob,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    ctx.publish(&job.object_ref(&()), type_, reason, "Reconcile", note)
        .await;
}
