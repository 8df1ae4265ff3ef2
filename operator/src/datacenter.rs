//! The Datacenter controller: connects to each Datacenter's cluster, keeps
//! its `Active` condition, and reconnects with exponential backoff.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use geoml_crds::Datacenter;
use geoml_crds::datacenter::RemoteCluster;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::clusters::{Cluster, Unavailable};
use crate::job::build::MANAGER;
use crate::{Context, Error, conditions};

const CONTROLLER: &str = "datacenter";
/// How long a probe of a cluster's apiserver may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the controller until `shutdown` completes.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let api = Api::<Datacenter>::all(ctx.client.clone());
    let controller = Controller::new(api, watcher::Config::default());
    let store = controller.store();
    controller
        .graceful_shutdown_on(shutdown)
        .run(
            move |dc, ctx| reconcile(dc, ctx, store.clone()),
            error_policy,
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

#[tracing::instrument(skip_all, fields(datacenter = %dc.name_any()))]
async fn reconcile(
    dc: Arc<Datacenter>,
    ctx: Arc<Context>,
    store: Store<Datacenter>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let name = dc.name_any();
    let state = connect(&dc, &ctx).await;
    let outcome = match &state {
        Ok(cluster) => cluster.available.clone(),
        Err(unavailable) => Err(unavailable.clone()),
    };
    ctx.clusters.set(&name, state);
    // Forget Datacenters that are gone (their watches stop with them).
    ctx.clusters.retain(|n| {
        store
            .get(&kube::runtime::reflector::ObjectRef::new(n))
            .is_some()
    });
    write_status(&dc, &ctx, &outcome).await?;
    Ok(match outcome {
        Ok(()) => {
            ctx.reset_backoff(&name);
            Action::requeue(ctx.settings.probe_interval)
        }
        Err(_) => Action::requeue(ctx.backoff(&name)),
    })
}

// kube-runtime hands the error policy owned `Arc`s.
#[allow(clippy::needless_pass_by_value)]
fn error_policy(dc: Arc<Datacenter>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(datacenter = %dc.name_any(), %error, "reconcile failed");
    ctx.metrics.failure(CONTROLLER, error.metric_label());
    Action::requeue(ctx.backoff(&dc.name_any()))
}

/// Connects to the Datacenter's cluster, reusing the connection while its
/// credentials stay the same, and probes its apiserver.
async fn connect(dc: &Datacenter, ctx: &Context) -> Result<Cluster, Unavailable> {
    let (client, fingerprint) = match &dc.spec.cluster.remote {
        None => (ctx.client.clone(), "local".to_owned()),
        Some(remote) => remote_client(remote, &ctx.client, &ctx.settings.namespace).await?,
    };
    let mut cluster = match ctx.clusters.get(&dc.name_any()) {
        Some(Ok(existing)) if existing.fingerprint == fingerprint => existing,
        _ => Cluster::connect(client, fingerprint, ctx.wake.clone()),
    };
    cluster.available = probe(&cluster.client).await;
    Ok(cluster)
}

async fn probe(client: &Client) -> Result<(), Unavailable> {
    match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(unavailable("Unreachable", error.to_string())),
        Err(_) => Err(unavailable(
            "Unreachable",
            format!(
                "the apiserver did not answer within {} s",
                PROBE_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// A client for a remote cluster from its kubeconfig Secret, and a
/// fingerprint of the kubeconfig. The Secret must be in `own_namespace`:
/// Datacenters are cluster-scoped, and whoever may create one must not make
/// the operator use another team's credentials.
async fn remote_client(
    remote: &RemoteCluster,
    hub: &Client,
    own_namespace: &str,
) -> Result<(Client, String), Unavailable> {
    let reference = &remote.kubeconfig_secret_ref;
    let at = format!("Secret {}/{}", reference.namespace, reference.name);
    if reference.namespace != own_namespace {
        return Err(unavailable(
            "KubeconfigSecretOutsideOperatorNamespace",
            format!(
                "spec.cluster.remote.kubeconfigSecretRef.namespace: {at} is refused: the operator reads kubeconfig Secrets only in its own namespace {own_namespace}"
            ),
        ));
    }
    let secret = Api::<Secret>::namespaced(hub.clone(), &reference.namespace)
        .get_opt(&reference.name)
        .await
        .map_err(|e| unavailable("KubeconfigSecretUnreadable", format!("reading {at}: {e}")))?
        .ok_or_else(|| unavailable("KubeconfigSecretMissing", format!("{at} does not exist")))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key))
        .ok_or_else(|| {
            unavailable(
                "KubeconfigKeyMissing",
                format!("{at} has no key {:?}", reference.key),
            )
        })?;
    let invalid = |e: &dyn std::fmt::Display| {
        unavailable(
            "KubeconfigInvalid",
            format!("{at} key {:?}: {e}", reference.key),
        )
    };
    let text = std::str::from_utf8(&bytes.0).map_err(|e| invalid(&e))?;
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|e| invalid(&e))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| invalid(&e))?;
    let client = Client::try_from(config).map_err(|e| invalid(&e))?;
    let mut hasher = DefaultHasher::new();
    bytes.0.hash(&mut hasher);
    Ok((client, format!("{:016x}", hasher.finish())))
}

fn unavailable(reason: &str, message: String) -> Unavailable {
    Unavailable {
        reason: reason.to_owned(),
        message,
    }
}

/// Writes the `Active` condition when it changed, and an event on each transition.
async fn write_status(
    dc: &Datacenter,
    ctx: &Context,
    outcome: &Result<(), Unavailable>,
) -> Result<(), Error> {
    let old = dc.status.clone().unwrap_or_default();
    let mut conditions = old.conditions.clone();
    let (active, reason, message) = match outcome {
        Ok(()) => (
            true,
            "Connected",
            "the cluster's apiserver answers".to_owned(),
        ),
        Err(u) => (false, u.reason.as_str(), u.message.clone()),
    };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let generation = dc.metadata.generation;
    conditions::set(
        &mut conditions,
        "Active",
        active,
        reason,
        &message,
        generation,
        &now,
    );
    if conditions == old.conditions && old.observed_generation == generation {
        return Ok(());
    }
    let was_active = conditions::get(&old.conditions, "Active").map(|c| c.status == "True");
    if was_active != Some(active) {
        let type_ = if active {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.publish(&dc.object_ref(&()), type_, reason, "Connect", &message)
            .await;
    }
    let patch = json!({
        "apiVersion": "geoml.io/v1alpha1",
        "kind": "Datacenter",
        "status": { "conditions": conditions, "observedGeneration": generation },
    });
    Api::<Datacenter>::all(ctx.client.clone())
        .patch_status(
            &dc.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(Error::kube("writing the Datacenter's status"))?;
    Ok(())
}
