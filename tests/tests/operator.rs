//! The operator against real control planes: one hub and two member
//! clusters stand for three datacenters. The operator runs in-process on
//! the hub; there is no kubelet, so the test plays it (and the cloud's load
//! balancer controller) by writing pod and Service status itself.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use clap::Parser as _;
use geoml_crds::roles::ParameterServerArgs;
use geoml_crds::{Datacenter, Topology, TrainingJob, yaml};
use geoml_operator::job::build::{RENEW_AFTER_ANNOTATION, secret_text};
use geoml_operator::{Operator, Settings};
use geoml_tests::{ControlPlane, eventually};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// `geoml ps`'s arguments, parsed from a pod's (the subcommand first).
#[derive(clap::Parser)]
struct PsCommand {
    #[command(flatten)]
    args: ParameterServerArgs,
}

const NS: &str = "ml";
const JOB: &str = "fashion-mnist-gaia";
/// Just under [`geoml_tests::EVENTUALLY`]: waits that describe what they
/// found before `eventually` panics.
const SHORTER: Duration = Duration::from_secs(59);

async fn create_namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// The objects of kind `K` in namespace `NS` that `lp` selects.
async fn labelled<K>(client: &Client, lp: &ListParams) -> Vec<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), NS)
        .list(lp)
        .await
        .unwrap()
        .items
}

/// The URI subject alternative name of the PEM certificate `pem`.
fn uri_name(pem: &str) -> String {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let names = cert.subject_alternative_name().unwrap().unwrap();
    names
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .unwrap()
}

/// A Secret in the hub's `geoml-system` holding a member's kubeconfig.
async fn kubeconfig_secret(hub: &Client, name: &str, member: &ControlPlane) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "kubeconfig".to_owned(),
            ByteString(std::fs::read(member.kubeconfig()).unwrap()),
        )])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(hub.clone(), "geoml-system")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

/// `manifests/examples/gaia-3dc.yaml` with eu-west and ap-southeast moved to
/// the member clusters (their kubeconfig Secrets), as its header says.
fn gaia_manifest() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/gaia-3dc.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = yaml::documents(&text).unwrap();
    for value in &mut docs {
        let name = value["metadata"]["name"].as_str().unwrap().to_owned();
        if value["kind"] == "Datacenter" && name != "us-east" {
            value["spec"]["cluster"] = json!({ "remote": {
                "kubeconfigSecretRef": { "name": format!("{name}-kubeconfig"), "namespace": "geoml-system" }
            }});
        }
    }
    yaml::to_stream(&docs).unwrap()
}

fn kubectl_apply(plane: &ControlPlane, yaml: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    let out = plane
        .kubectl()
        .args(["apply", "--server-side", "-n", NS, "-f"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn job(hub: &Client, name: &str) -> TrainingJob {
    Api::<TrainingJob>::namespaced(hub.clone(), NS)
        .get(name)
        .await
        .unwrap()
}

fn condition(job: &TrainingJob, type_: &str) -> Option<(String, String, String)> {
    let c = job
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the job's condition `type_` has `status`; returns its reason and message.
async fn wait_condition(hub: &Client, name: &str, type_: &str, status: &str) -> (String, String) {
    let last = job(hub, name).await;
    let what = format!("{name} {type_}={status}");
    let wait = eventually(&what, || async {
        let (s, reason, message) = condition(&job(hub, name).await, type_)?;
        (s == status).then_some((reason, message))
    });
    if let Ok(found) = tokio::time::timeout(SHORTER, wait).await {
        return found;
    }
    let now = job(hub, name).await;
    panic!(
        "timed out waiting for {what}; status was {:#?}, now {:#?}",
        last.status, now.status
    );
}

async fn job_pods(client: &Client) -> Vec<Pod> {
    let selector = format!("geoml.io/job={JOB}");
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
}

async fn wait_pod_count(client: &Client, n: usize, step: &str) -> Vec<Pod> {
    let what = format!("{n} pods ({step})");
    let wait = eventually(&what, || async {
        let pods = job_pods(client).await;
        (pods.len() == n).then_some(pods)
    });
    if let Ok(pods) = tokio::time::timeout(SHORTER, wait).await {
        return pods;
    }
    let names: Vec<String> = job_pods(client)
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    panic!("timed out waiting for {n} pods ({step}); there are {names:?}");
}

/// Plays the cloud controller: gives a LoadBalancer Service an address.
async fn assign_load_balancer(client: &Client, name: &str, ip: &str) {
    let api = Api::<Service>::namespaced(client.clone(), NS);
    eventually(&format!("Service {name}"), || async {
        api.get_opt(name).await.unwrap()
    })
    .await;
    let status = json!({ "status": { "loadBalancer": { "ingress": [{ "ip": ip }] } } });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Plays the kubelet: marks a pod Failed.
async fn fail_pod(client: &Client, name: &str) {
    let status =
        json!({ "status": { "phase": "Failed", "reason": "Error", "message": "exit code 3" } });
    Api::<Pod>::namespaced(client.clone(), NS)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn topology(client: &Client, dc: &str) -> (Topology, String) {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get(&format!("{JOB}-{dc}-topology"))
        .await
        .unwrap();
    let data = cm.data.unwrap();
    (
        Topology::from_yaml(&data["topology.yaml"]).unwrap(),
        data["manifest.yaml"].clone(),
    )
}

async fn patch_job(hub: &Client, name: &str, patch: serde_json::Value) {
    Api::<TrainingJob>::namespaced(hub.clone(), NS)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one scenario over shared clusters: starting them is the slow part
async fn training_jobs_become_pods_services_and_topologies_in_every_cluster() {
    // The operator's log, with RUST_LOG=geoml_operator=debug for example.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (hub, eu, ap) = tokio::join!(
        ControlPlane::start("hub"),
        ControlPlane::start("eu-west"),
        ControlPlane::start("ap-southeast")
    );
    let (hub_plane, eu_plane, mut ap_plane) = (hub.unwrap(), eu.unwrap(), ap.unwrap());
    hub_plane.install_crds().await.unwrap();
    let (hub, eu, ap) = (hub_plane.client(), eu_plane.client(), ap_plane.client());
    create_namespace(&hub, "geoml-system").await;
    create_namespace(&hub, NS).await;
    kubeconfig_secret(&hub, "eu-west-kubeconfig", &eu_plane).await;
    kubeconfig_secret(&hub, "ap-southeast-kubeconfig", &ap_plane).await;

    let settings = Settings {
        default_image: "geoml:test".into(),
        namespace: "geoml-system".into(),
        probe_interval: Duration::from_secs(1),
        max_backoff: Duration::from_secs(2),
        progress_interval: Duration::from_secs(30),
    };
    let operator = Operator::new(hub.clone(), settings).unwrap();
    let metrics = operator.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));

    // Invalid references: a condition that says why, and no hot loop.
    kubectl_apply(
        &hub_plane,
        r"
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {name: orphan}
spec:
  region: nowhere
  cluster: {remote: {kubeconfigSecretRef: {name: missing, namespace: geoml-system}}}
---
apiVersion: geoml.io/v1alpha1
kind: SyncPolicy
metadata: {name: plain}
spec: {}
---
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {name: no-policy}
spec:
  model: {kind: SoftmaxRegression}
  dataset: {name: Digits}
  datacenters: [{name: us-east}]
  syncPolicyRef: {name: nope}
---
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {name: no-datacenter}
spec:
  model: {kind: SoftmaxRegression}
  dataset: {name: Digits}
  datacenters: [{name: mars}]
  syncPolicyRef: {name: plain}
---
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {name: no-secret}
spec:
  model: {kind: SoftmaxRegression}
  dataset: {name: Digits}
  datacenters: [{name: orphan}]
  syncPolicyRef: {name: plain}
",
    );
    let (reason, message) = wait_condition(&hub, "no-policy", "Created", "False").await;
    assert_eq!(reason, "SyncPolicyNotFound");
    assert!(message.contains("ml/nope"), "{message}");
    let (reason, message) = wait_condition(&hub, "no-datacenter", "Created", "False").await;
    assert_eq!(reason, "DatacenterNotFound");
    assert!(message.contains("mars"), "{message}");
    let (reason, message) =
        wait_condition(&hub, "no-secret", "DatacenterUnavailable", "True").await;
    assert_eq!(reason, "KubeconfigSecretMissing");
    assert!(
        message.contains("orphan") && message.contains("geoml-system/missing"),
        "{message}"
    );
    let dc = Api::<Datacenter>::all(hub.clone())
        .get("orphan")
        .await
        .unwrap();
    let active = &dc.status.unwrap().conditions[0];
    assert_eq!(
        (active.status.as_str(), active.reason.as_str()),
        ("False", "KubeconfigSecretMissing")
    );
    let before: Vec<String> = {
        let mut v = Vec::new();
        for name in ["no-policy", "no-datacenter", "no-secret"] {
            v.push(job(&hub, name).await.resource_version().unwrap());
        }
        v
    };
    let reconciled = metrics.reconciliations("trainingjob");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = metrics.reconciliations("trainingjob") - reconciled;
    assert!(
        idle <= 3,
        "{idle} job reconciliations in 4 s with nothing to do"
    );
    for (name, rv) in ["no-policy", "no-datacenter", "no-secret"]
        .iter()
        .zip(before)
    {
        assert_eq!(
            job(&hub, name).await.resource_version().unwrap(),
            rv,
            "{name} status rewritten"
        );
    }
    for name in ["no-policy", "no-datacenter", "no-secret"] {
        Api::<TrainingJob>::namespaced(hub.clone(), NS)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    // Apply gaia-3dc.yaml: us-east in the hub, the others in the members.
    kubectl_apply(&hub_plane, &gaia_manifest());
    // Once the members are connected, the job waits for load-balancer addresses.
    eventually("WaitingForMirrorEndpoints", || async {
        let (_, reason, _) = condition(&job(&hub, JOB).await, "Created")?;
        (reason == "WaitingForMirrorEndpoints").then_some(())
    })
    .await;
    for (client, dc, ip) in [
        (&hub, "us-east", "203.0.113.1"),
        (&eu, "eu-west", "203.0.113.2"),
        (&ap, "ap-southeast", "203.0.113.3"),
    ] {
        assign_load_balancer(client, &format!("{JOB}-{dc}-ps-0-peer"), ip).await;
    }
    wait_condition(&hub, JOB, "Created", "True").await;
    let ips = BTreeMap::from([
        ("us-east", "203.0.113.1"),
        ("eu-west", "203.0.113.2"),
        ("ap-southeast", "203.0.113.3"),
    ]);
    let ca_secret = Api::<Secret>::namespaced(hub.clone(), NS)
        .get(&format!("{JOB}-ca"))
        .await
        .unwrap();
    let ca = secret_text(&ca_secret, "ca.crt");
    assert!(ca.is_some() && secret_text(&ca_secret, "ca.key").is_some());
    for (client, dc) in [(&hub, "us-east"), (&eu, "eu-west"), (&ap, "ap-southeast")] {
        let pods = wait_pod_count(client, 3, dc).await;
        let mut names: Vec<String> = pods.iter().map(ResourceExt::name_any).collect();
        names.sort();
        assert_eq!(
            names,
            [
                format!("{JOB}-{dc}-ps-0"),
                format!("{JOB}-{dc}-worker-0"),
                format!("{JOB}-{dc}-worker-1")
            ]
        );
        let ps = pods
            .iter()
            .find(|p| p.name_any().ends_with("-ps-0"))
            .unwrap();
        let container = &ps.spec.as_ref().unwrap().containers[0];
        assert_eq!(container.image.as_deref(), Some("geoml:test"));
        // The command line parses as `geoml ps` does.
        let args = container.args.as_ref().unwrap();
        assert_eq!(args[0], ParameterServerArgs::SUBCOMMAND, "{args:?}");
        let parsed = PsCommand::try_parse_from(args).unwrap().args;
        assert_eq!(parsed.shard, 0);
        assert!(!parsed.role.tls.insecure_plaintext, "{args:?}");
        assert_eq!(
            parsed.role.manifest,
            Path::new("/etc/geoml/job/manifest.yaml")
        );
        assert_eq!(
            parsed.role.topology,
            Path::new("/etc/geoml/job/topology.yaml")
        );
        let env = container.env.as_ref().unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "GEOML_DATACENTER" && e.value.as_deref() == Some(dc))
        );
        // Owner references only where the job lives.
        assert_eq!(
            ps.metadata.owner_references.is_some(),
            dc == "us-east",
            "{dc}"
        );
        Api::<Service>::namespaced(client.clone(), NS)
            .get(&format!("{JOB}-{dc}"))
            .await
            .unwrap();
        let (topology, manifest) = topology(client, dc).await;
        assert_eq!(topology.datacenter, dc);
        // Its own shard by the cluster IP of the shard's Service: no cluster DNS needed.
        let shard = Api::<Service>::namespaced(client.clone(), NS)
            .get(&format!("{JOB}-{dc}-ps-0-peer"))
            .await
            .unwrap();
        let ip = shard.spec.unwrap().cluster_ip.unwrap();
        assert_eq!(topology.parameter_servers, [format!("http://{ip}:7070")]);
        let mirrors: BTreeMap<&str, Vec<String>> = ips
            .iter()
            .filter(|(other, _)| **other != dc)
            .map(|(other, ip)| (*other, vec![format!("http://{ip}:7070")]))
            .collect();
        assert_eq!(
            topology
                .mirrors
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            mirrors
        );
        let parsed = geoml_crds::manifest::Manifest::from_yaml(&manifest).unwrap();
        assert_eq!(parsed.job().unwrap().datacenters.len(), 3);
        // mTLS: each role's certificate, from the job's CA, names its
        // datacenter and role.
        for role in ["ps", "worker"] {
            let secret = Api::<Secret>::namespaced(client.clone(), NS)
                .get(&format!("{JOB}-{dc}-{role}-tls"))
                .await
                .unwrap();
            assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
            assert_eq!(secret_text(&secret, "ca.crt"), ca);
            let cert = secret_text(&secret, "tls.crt").unwrap();
            assert_eq!(uri_name(&cert), format!("geoml://{dc}/{role}"));
            assert!(secret.annotations().contains_key(RENEW_AFTER_ANNOTATION));
        }
    }
    let status = job(&hub, JOB).await.status.unwrap();
    assert_eq!(status.per_datacenter.len(), 3);
    assert_eq!(status.per_datacenter[1].workers.desired, 2);
    assert_eq!(status.datacenters_ready.as_deref(), Some("0/3"));
    // The status may lag the pods by a reconciliation or two (one computed
    // while the last pod was being created names fewer).
    let (reason, message) = eventually("Running to name all nine pods", || async {
        let (_, reason, message) = condition(&job(&hub, JOB).await, "Running")?;
        message.contains("and 6 more").then_some((reason, message))
    })
    .await;
    assert_eq!(reason, "PodsNotReady");
    assert!(
        message.starts_with("0/9 pods ready; not ready: "),
        "{message}"
    );
    assert!(
        message.contains("(Pending)") && message.contains("and 6 more"),
        "{message}"
    );

    // Editing the SyncPolicy rewrites the topology ConfigMaps, not the pods.
    let uids: Vec<_> = job_pods(&ap)
        .await
        .iter()
        .map(|p| p.uid().unwrap())
        .collect();
    Api::<geoml_crds::SyncPolicy>::namespaced(hub.clone(), NS)
        .patch(
            "gaia",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": { "significance": { "threshold": 0.05 } } })),
        )
        .await
        .unwrap();
    eventually("the new threshold in ap-southeast's manifest", || async {
        topology(&ap, "ap-southeast")
            .await
            .1
            .contains("threshold: 0.05")
            .then_some(())
    })
    .await;
    let mut after: Vec<_> = job_pods(&ap)
        .await
        .iter()
        .map(|p| p.uid().unwrap())
        .collect();
    let mut uids = uids;
    uids.sort();
    after.sort();
    assert_eq!(uids, after, "pods were replaced");

    // A change running pods cannot take is refused, with the field named,
    // and the mounted manifest keeps the old model; undoing it clears that.
    let set_model = |model: &'static str| {
        let hub = hub.clone();
        async move {
            Api::<geoml_crds::SyncPolicy>::namespaced(hub, NS)
                .patch(
                    "gaia",
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "spec": { "interDatacenter": { "model": model } } })),
                )
                .await
                .unwrap();
        }
    };
    set_model("FedAvg").await;
    let (reason, message) = wait_condition(&hub, JOB, "SyncPolicyChangeRefused", "True").await;
    assert_eq!(reason, "NeedsNewPods");
    assert!(message.contains("interDatacenter.model"), "{message}");
    assert!(topology(&ap, "ap-southeast").await.1.contains("model: ASP"));
    set_model("ASP").await;
    wait_condition(&hub, JOB, "SyncPolicyChangeRefused", "False").await;

    // A member's apiserver stops: DatacenterUnavailable naming it; back when it returns.
    ap_plane.stop_apiserver();
    let (reason, message) = wait_condition(&hub, JOB, "DatacenterUnavailable", "True").await;
    assert_eq!(reason, "Unreachable");
    assert!(message.contains("ap-southeast"), "{message}");
    ap_plane.restart_apiserver().await.unwrap();
    let (reason, _) = wait_condition(&hub, JOB, "DatacenterUnavailable", "False").await;
    assert_eq!(reason, "AllDatacentersActive");

    // Suspend deletes the pods everywhere and keeps the rest; resume brings them back.
    patch_job(
        &hub,
        JOB,
        json!({ "spec": { "runPolicy": { "suspend": true } } }),
    )
    .await;
    for client in [&hub, &eu, &ap] {
        wait_pod_count(client, 0, "suspended").await;
    }
    wait_condition(&hub, JOB, "Suspended", "True").await;
    assert_eq!(
        job(&hub, JOB).await.status.unwrap().phase,
        Some(geoml_crds::training_job::JobPhase::Suspended)
    );
    topology(&eu, "eu-west").await;
    patch_job(
        &hub,
        JOB,
        json!({ "spec": { "runPolicy": { "suspend": false } } }),
    )
    .await;
    for client in [&hub, &eu, &ap] {
        wait_pod_count(client, 3, "resumed").await;
    }
    wait_condition(&hub, JOB, "Suspended", "False").await;

    // Failed pods are recreated until the backoff limit is spent.
    patch_job(
        &hub,
        JOB,
        json!({ "spec": { "runPolicy": { "backoffLimit": 1 } } }),
    )
    .await;
    let worker = format!("{JOB}-eu-west-worker-0");
    let pods = Api::<Pod>::namespaced(eu.clone(), NS);
    let first_uid = pods.get(&worker).await.unwrap().uid();
    fail_pod(&eu, &worker).await;
    eventually("worker-0 recreated", || async {
        let pod = pods.get_opt(&worker).await.unwrap()?;
        (pod.uid() != first_uid).then_some(())
    })
    .await;
    eventually("one retry", || async {
        (job(&hub, JOB).await.status?.retries == 1).then_some(())
    })
    .await;
    fail_pod(&eu, &worker).await;
    let (reason, message) = wait_condition(&hub, JOB, "Failed", "True").await;
    assert_eq!(reason, "BackoffLimitExceeded");
    assert!(
        message.contains(&worker) && message.contains("exit code 3"),
        "{message}"
    );
    // cleanPodPolicy Running: the pods still running are deleted, the failed one stays.
    wait_pod_count(&eu, 1, "failed eu-west").await;
    wait_pod_count(&hub, 0, "failed us-east").await;

    // Deleting the job deletes its objects in every cluster.
    Api::<TrainingJob>::namespaced(hub.clone(), NS)
        .delete(JOB, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the job gone", || async {
        Api::<TrainingJob>::namespaced(hub.clone(), NS)
            .get_opt(JOB)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    for client in [&hub, &eu, &ap] {
        let selector = format!("geoml.io/job={JOB}");
        let lp = ListParams::default().labels(&selector);
        assert!(job_pods(client).await.is_empty());
        assert!(labelled::<Service>(client, &lp).await.is_empty());
        assert!(labelled::<ConfigMap>(client, &lp).await.is_empty());
        assert!(labelled::<Secret>(client, &lp).await.is_empty());
    }

    // activeDeadlineSeconds fails a job; ttlSecondsAfterFinished then deletes it.
    kubectl_apply(
        &hub_plane,
        r"
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {name: lan}
spec:
  region: here
  cluster: {local: {}}
  peerAccess: {serviceType: ClusterIP}
---
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {name: short}
spec:
  model: {kind: SoftmaxRegression}
  dataset: {name: Digits}
  datacenters: [{name: lan}]
  syncPolicyRef: {name: plain}
  runPolicy: {activeDeadlineSeconds: 2, ttlSecondsAfterFinished: 3}
",
    );
    let (reason, _) = wait_condition(&hub, "short", "Failed", "True").await;
    assert_eq!(reason, "DeadlineExceeded");
    eventually("the finished job deleted after its TTL", || async {
        let gone = Api::<TrainingJob>::namespaced(hub.clone(), NS)
            .get_opt("short")
            .await
            .unwrap()
            .is_none();
        gone.then_some(())
    })
    .await;

    let _ = stop.send(());
    running.await.unwrap();
}
