//! Build and apply: every datacenter's Services first (their addresses are
//! the mirror endpoints), then its topology ConfigMap, the registry and the
//! pods, and the conditions that say how far that got.

use std::collections::BTreeSet;
use std::time::Duration;

use geoml_crds::manifest::Manifest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt};

use super::build::{self, CONFIG_HASH_ANNOTATION, JobView, Placement, SPEC_HASH_ANNOTATION};
use super::objects::{apply_object, delete_ignoring_missing, ensure_namespace, publish};
use super::resolve::Blocked;
use super::{ENDPOINT_POLL, Outcome};
use crate::clusters::{Cluster, Unavailable};
use crate::{Context, Error};

/// Places the job's objects (none of its pods while it is suspended) and
/// sets `Created`, `SyncPolicyChangeRefused` and `Suspended`. Returns when
/// to look again.
pub(super) async fn step(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    ctx: &Context,
    out: &mut Outcome,
) -> Result<Option<Duration>, Error> {
    let job = &view.job;
    let mut requeue = None;
    let suspended = job.spec.run_policy.suspend;
    let mut refused = Vec::new();
    let created = place(view, clusters, suspended, &mut refused).await?;
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
        if !out.is("Suspended") {
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
        if out.is("Suspended") {
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
    Ok(requeue)
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
        let config_map = view.config_map(i, &manifest, &topology)?;
        let config_hash = build::content_hash(&config_map.data);
        apply_object(&cluster.client, &p.namespace, &config_map).await?;
        objects += 1;
        let site = endpoints.sites.get(i).map_or("", String::as_str);
        objects += sync_pods(view, p, site, cluster, suspended, &config_hash).await?;
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
    let policy = Manifest::from_yaml(&text)
        .ok()
        .and_then(|m| m.sync_policies.into_iter().next());
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
    // Inside its own cluster and from the others; the same address when
    // the others share the cluster.
    let through_access = view.peers_use_peer_access(p);
    let urls = |applied: &Service, offset: i32| {
        let local = build::local_url(applied)?;
        let peer = if through_access {
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
/// while suspended), and marks live ones with the `config_hash` of the
/// ConfigMap they mount, so that their kubelet refreshes it at once. Returns
/// how many pods the job wants there.
async fn sync_pods(
    view: &JobView,
    p: &Placement,
    site_url: &str,
    cluster: &Cluster,
    suspended: bool,
    config_hash: &str,
) -> Result<usize, Error> {
    let mut desired = if suspended {
        Vec::new()
    } else {
        view.pods(p, site_url)
    };
    for pod in &mut desired {
        pod.annotations_mut()
            .insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned());
    }
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
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if stale || !wanted.contains(&pod.name_any()) {
            delete_ignoring_missing(&api, &pod.name_any()).await?;
        } else if live(pod)
            && pod
                .annotations()
                .get(CONFIG_HASH_ANNOTATION)
                .map(String::as_str)
                != Some(config_hash)
        {
            mark_config(&api, &pod.name_any(), config_hash).await?;
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

/// Whether `pod` is Pending or Running (its containers may still read the
/// ConfigMap).
fn live(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        None | Some("Pending" | "Running")
    )
}

/// Sets `pod`'s [`CONFIG_HASH_ANNOTATION`] to `hash`; a pod already gone is
/// fine.
async fn mark_config(api: &Api<Pod>, pod: &str, hash: &str) -> Result<(), Error> {
    let patch =
        serde_json::json!({ "metadata": { "annotations": { CONFIG_HASH_ANNOTATION: hash } } });
    let params = PatchParams {
        field_manager: Some(build::MANAGER.to_owned()),
        ..PatchParams::default()
    };
    match api.patch(pod, &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("annotating pod {pod}"))(e)),
    }
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
