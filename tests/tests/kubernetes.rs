//! TrainingJobs on real one-node clusters: the images this repository builds,
//! the operator running as a pod, `kubectl apply` of the examples, and the
//! jobs trained to `Succeeded` by real pods (one of them with certificates
//! from cert-manager).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::process::Command;
use std::time::{Duration, Instant};

use geoml_crds::training_job::{DatasetName, JobPhase};
use geoml_crds::{Datacenter, TrainingJob, yaml};
use geoml_tests::cert_manager::{CA_ISSUER, CertManager};
use geoml_tests::{Cluster, data_cache, eventually_within, example, geoml_images};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::json;

/// Longest a job may take from apply to a finished phase.
const TRAINING: Duration = Duration::from_secs(15 * 60);

/// Runs `cmd` (kubectl) with `stdin`, asserting success; returns stdout.
fn run(cmd: &mut Command, stdin: Option<&str>) -> String {
    geoml_tests::run(cmd, stdin).unwrap()
}

/// The value in column `name` of the first row of `kubectl get` output.
fn column(table: &str, name: &str) -> Option<String> {
    let mut lines = table.lines();
    let start = lines.next()?.find(name)?;
    let row = lines.next()?;
    row.get(start..)?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

fn apply(cluster: &Cluster, manifest: &str) {
    run(cluster.kubectl().args(["apply", "-f", "-"]), Some(manifest));
}

async fn job(cluster: &Cluster, name: &str) -> TrainingJob {
    Api::<TrainingJob>::namespaced(cluster.client(), "default")
        .get(name)
        .await
        .unwrap()
}

async fn job_pods(cluster: &Cluster, job: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(cluster.client(), "default")
        .list(&ListParams::default().labels(&format!("geoml.io/job={job}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Waits until `job` is Succeeded and returns it; fails at once, with its
/// status, if it fails.
async fn wait_for_success(cluster: &Cluster, name: &str) -> TrainingJob {
    eventually_within(TRAINING, &format!("{name} to succeed"), || async {
        let job = job(cluster, name).await;
        let status = job.status.clone().unwrap_or_default();
        assert_ne!(status.phase, Some(JobPhase::Failed), "{status:#?}");
        (status.phase == Some(JobPhase::Succeeded)).then_some(job)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn fashion_mnist_lan_trains_to_succeeded_on_a_real_node() {
    let data = data_cache(DatasetName::FashionMnist).unwrap();
    let images = geoml_images().unwrap();
    let cluster = Cluster::start("lan", &images).await.unwrap();
    cluster.install_operator().await.unwrap();
    cluster.provide_data("default", &data).await.unwrap();

    let applied = Instant::now();
    apply(&cluster, &example("fashion-mnist-lan.yaml").unwrap());
    let pods = eventually_within(Duration::from_secs(180), "6 pods Running", || async {
        let pods = job_pods(&cluster, "fashion-mnist-lan").await;
        (pods.len() == 6 && pods.iter().all(|p| phase(p) == "Running")).then_some(pods)
    })
    .await;
    let running = applied.elapsed();
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(cluster.node().name()));
        let security = spec.containers[0].security_context.as_ref().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(spec.automount_service_account_token, Some(false));
    }

    // `kubectl get tj` shows the clock rising, and the metric, while the job
    // runs (until it has risen three times or the job is done).
    let mut clocks = Vec::new();
    let mut metrics = Vec::new();
    let output = eventually_within(TRAINING, "the clock to rise", || {
        let out = run(
            cluster.kubectl().args(["get", "tj", "fashion-mnist-lan"]),
            None,
        );
        let column = |name: &str| column(&out, name);
        if let Some(clock) = column("CLOCK").and_then(|c| c.parse::<i64>().ok())
            && clocks.last() != Some(&clock)
        {
            clocks.push(clock);
            metrics.extend(column("METRIC").and_then(|m| m.parse::<f64>().ok()));
        }
        let done = clocks.len() >= 3 || column("PHASE").as_deref() == Some("Succeeded");
        async move { done.then_some(out) }
    })
    .await;
    assert!(
        clocks.len() >= 2 && clocks.windows(2).all(|w| w[0] < w[1]),
        "clocks {clocks:?} in\n{output}"
    );
    assert!(!metrics.is_empty(), "no metric in\n{output}");

    let done = wait_for_success(&cluster, "fashion-mnist-lan").await;
    let succeeded = applied.elapsed();
    let status = done.status.unwrap();
    assert_eq!(status.metric_name.as_deref(), Some("accuracy"));
    let metric = status.metric.unwrap();
    assert!(metric >= 0.83, "accuracy {metric} below the target 0.83");
    // cleanPodPolicy Running (the default): nothing was running at the end,
    // so the finished pods stay for their logs.
    let pods = job_pods(&cluster, "fashion-mnist-lan").await;
    assert_eq!(pods.len(), 6);
    assert!(
        pods.iter().all(|p| phase(p) == "Succeeded"),
        "{:?}",
        pods.iter()
            .map(|p| (p.name_any(), phase(p).to_owned()))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "fashion-mnist-lan: all pods Running {:.1} s after apply, Succeeded after {:.1} s, accuracy {metric:.4}, clocks seen {clocks:?}",
        running.as_secs_f64(),
        succeeded.as_secs_f64()
    );
}

/// The example with its Datacenters spread over `clusters`: the first stays
/// local (the hub, where the operator runs), each other one becomes the
/// remote cluster at the same position, reached through the kubeconfig
/// Secret `<cluster>-kubeconfig`; every datacenter exposes its parameter
/// servers as NodePorts (the test bed has no load balancer).
fn spread_over(manifest: &str, clusters: &[Cluster]) -> String {
    let mut docs = yaml::documents(manifest).unwrap();
    let mut dc = 0;
    for value in &mut docs {
        if value["kind"] == "Datacenter" {
            let spec = &mut value["spec"];
            if dc > 0 {
                let secret = format!("{}-kubeconfig", clusters[dc].name());
                spec["cluster"] = json!({"remote": {"kubeconfigSecretRef": {
                    "name": secret, "namespace": "geoml-system"
                }}});
            }
            spec["peerAccess"] = json!({"serviceType": "NodePort"});
            dc += 1;
        }
    }
    yaml::to_stream(&docs).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn gaia_trains_across_three_clusters() {
    let data = data_cache(DatasetName::FashionMnist).unwrap();
    let images = geoml_images().unwrap();
    let (a, b, c) = tokio::join!(
        Cluster::start("us-east", &images),
        Cluster::start("eu-west", &images),
        Cluster::start("ap-southeast", &images)
    );
    let clusters = [a.unwrap(), b.unwrap(), c.unwrap()];
    let hub = &clusters[0];
    hub.install_operator().await.unwrap();
    for cluster in &clusters {
        cluster.provide_data("default", &data).await.unwrap();
    }
    for remote in &clusters[1..] {
        remote.publish_kubeconfig(hub).await.unwrap();
    }

    let applied = Instant::now();
    apply(
        hub,
        &spread_over(&example("gaia-3dc.yaml").unwrap(), &clusters),
    );
    for cluster in &clusters {
        eventually_within(
            Duration::from_secs(240),
            "3 pods per cluster Running",
            || async {
                let pods = job_pods(cluster, "fashion-mnist-gaia").await;
                (pods.len() == 3 && pods.iter().all(|p| phase(p) == "Running")).then_some(())
            },
        )
        .await;
    }
    let running = applied.elapsed();
    let done = wait_for_success(hub, "fashion-mnist-gaia").await;
    let succeeded = applied.elapsed();
    let status = done.status.unwrap();
    let wan = status.wan_bytes.unwrap_or(0);
    assert!(wan > 0, "no WAN bytes in {status:#?}");
    for dc in &status.per_datacenter {
        let sent = dc.updates_sent_fraction.unwrap_or(0.0);
        assert!(
            sent > 0.0 && sent < 1.0,
            "{}: fraction of updates sent {sent}",
            dc.name
        );
    }
    // Every ordered pair of datacenters is a link that delivered bytes,
    // priced with the sender's egressCostPerGiB; the bytes the job reports
    // are those delivered.
    let dcs: Vec<&str> = status
        .per_datacenter
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        status.links.len(),
        dcs.len() * (dcs.len() - 1),
        "{:#?}",
        status.links
    );
    for link in &status.links {
        assert!(
            dcs.contains(&link.from.as_str())
                && dcs.contains(&link.to.as_str())
                && link.from != link.to
        );
        assert!(
            link.delivered_bytes > 0 && link.delivered_bytes <= link.sent_bytes,
            "{link:#?}"
        );
        assert!(link.egress_cost.is_some_and(|c| c > 0.0), "{link:#?}");
    }
    let delivered: i64 = status.links.iter().map(|l| l.delivered_bytes).sum();
    assert_eq!(wan, delivered);
    assert!(status.egress_cost.is_some_and(|c| c > 0.0));
    // Each Datacenter shows what its mirror clock measured to its peers.
    for name in &dcs {
        let dc = Api::<Datacenter>::all(hub.client())
            .get(name)
            .await
            .unwrap();
        let peers = dc.status.unwrap_or_default().peers;
        assert_eq!(peers.len(), dcs.len() - 1, "{name}: {peers:#?}");
        assert!(
            peers
                .iter()
                .all(|p| p.rtt_ms > 0.0 && p.throughput_mbps > 0.0),
            "{name}: {peers:#?}"
        );
    }
    let cost = status.egress_cost.unwrap_or_default();
    eprintln!(
        "fashion-mnist-gaia over 3 clusters: all pods started {:.1} s after apply, Succeeded after {:.1} s, \
         accuracy {:?}, WAN bytes {wan}, egress cost {cost:.6}, fraction sent {:?}",
        running.as_secs_f64(),
        succeeded.as_secs_f64(),
        status.metric,
        status
            .per_datacenter
            .iter()
            .map(|d| d.updates_sent_fraction)
            .collect::<Vec<_>>()
    );
    threshold_edit_applies_live(&clusters).await;
}

/// The value of gauge `name` in pod `pod`'s `/metrics`, read through the
/// apiserver's pod proxy.
async fn gauge(cluster: &Cluster, pod: &str, name: &str) -> Option<f64> {
    let request = http::Request::get(format!(
        "/api/v1/namespaces/default/pods/{pod}:9090/proxy/metrics"
    ))
    .body(Vec::new())
    .ok()?;
    let text = cluster.client().request_text(request).await.ok()?;
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

fn uids(pods: &[Pod]) -> Vec<String> {
    let mut uids: Vec<String> = pods.iter().filter_map(ResourceExt::uid).collect();
    uids.sort();
    uids
}

/// `manifest` with its TrainingJob renamed `name` and stopping only after
/// `max_clocks` (no target): a job that runs until it is deleted.
fn long_running(manifest: &str, name: &str, max_clocks: u64) -> String {
    let mut docs = yaml::documents(manifest).unwrap();
    for value in &mut docs {
        if value["kind"] == "TrainingJob" {
            value["metadata"]["name"] = name.into();
            value["spec"]["stopping"] = json!({"maxClocks": max_clocks});
        }
    }
    yaml::to_stream(&docs).unwrap()
}

/// A SyncPolicy threshold edit reaches every running parameter server in
/// every cluster, without restarting a pod.
async fn threshold_edit_applies_live(clusters: &[Cluster]) {
    let hub = &clusters[0];
    let example = example("gaia-3dc.yaml").unwrap();
    let threshold = yaml::documents(&example)
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "SyncPolicy")
        .and_then(|d| d["spec"]["significance"]["threshold"].as_f64())
        .unwrap();
    let manifest = long_running(&spread_over(&example, clusters), "gaia-live", 1_000_000);
    apply(hub, &manifest);
    let mut before = Vec::new();
    for cluster in clusters {
        let pods = eventually_within(Duration::from_secs(180), "gaia-live Running", || async {
            let pods = job_pods(cluster, "gaia-live").await;
            (pods.len() == 3 && pods.iter().all(|p| phase(p) == "Running")).then_some(pods)
        })
        .await;
        before.push(uids(&pods));
    }
    let ps_pods: Vec<(usize, String)> = ["us-east", "eu-west", "ap-southeast"]
        .iter()
        .enumerate()
        .map(|(i, dc)| (i, format!("gaia-live-{dc}-ps-0")))
        .collect();
    for (i, pod) in &ps_pods {
        let cluster = &clusters[*i];
        eventually_within(
            Duration::from_secs(60),
            &format!("the example's threshold {threshold}"),
            || async {
                (gauge(cluster, pod, "geoml_mirror_threshold").await == Some(threshold))
                    .then_some(())
            },
        )
        .await;
    }
    run(
        hub.kubectl().args([
            "patch",
            "sp",
            "gaia",
            "--type=merge",
            "-p",
            r#"{"spec":{"significance":{"threshold":0.05}}}"#,
        ]),
        None,
    );
    let edited = Instant::now();
    for (i, pod) in &ps_pods {
        let cluster = &clusters[*i];
        eventually_within(
            Duration::from_secs(30),
            &format!("{pod} at threshold 0.05"),
            || async {
                (gauge(cluster, pod, "geoml_mirror_threshold").await == Some(0.05)).then_some(())
            },
        )
        .await;
    }
    eprintln!(
        "threshold edit seen by every parameter server {:.1} s after kubectl patch",
        edited.elapsed().as_secs_f64()
    );
    for (cluster, before) in clusters.iter().zip(&before) {
        assert_eq!(&uids(&job_pods(cluster, "gaia-live").await), before);
    }
    run(
        hub.kubectl()
            .args(["delete", "tj", "gaia-live", "--wait=true"]),
        None,
    );
}

/// `manifest` with its SyncPolicy's inter-datacenter model set to `model`.
fn with_model(manifest: &str, model: &str) -> String {
    let mut docs = yaml::documents(manifest).unwrap();
    for value in &mut docs {
        if value["kind"] == "SyncPolicy" {
            value["spec"]["interDatacenter"] = json!({"model": model});
        }
    }
    yaml::to_stream(&docs).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_parameter_server_resumes_and_a_multi_datacenter_lan_job_trains() {
    let data = data_cache(DatasetName::FashionMnist).unwrap();
    let images = geoml_images().unwrap();
    let cluster = Cluster::start("recovery", &images).await.unwrap();
    cluster.install_operator().await.unwrap();
    cluster.provide_data("default", &data).await.unwrap();

    // The example checkpoints every 20 clocks into a claim the operator
    // creates; kill shard 0 once it has checkpointed twice.
    apply(&cluster, &example("fashion-mnist-lan.yaml").unwrap());
    let ps = "fashion-mnist-lan-lan-ps-0";
    let clock = eventually_within(TRAINING, "clock 40 on shard 0", || async {
        let clock = gauge(&cluster, ps, "geoml_ps_clock").await?;
        (clock >= 40.0).then_some(clock)
    })
    .await;
    let killed = job_pods(&cluster, "fashion-mnist-lan")
        .await
        .into_iter()
        .find(|p| p.name_any() == ps)
        .and_then(|p| p.uid())
        .unwrap();
    run(
        cluster
            .kubectl()
            .args(["delete", "pod", ps, "--wait=false"]),
        None,
    );
    let resumed = eventually_within(Duration::from_secs(120), "shard 0 back", || async {
        let pod = job_pods(&cluster, "fashion-mnist-lan")
            .await
            .into_iter()
            .find(|p| {
                p.name_any() == ps && p.uid().as_ref() != Some(&killed) && phase(p) == "Running"
            })?;
        let clock = gauge(&cluster, ps, "geoml_ps_clock").await?;
        Some((pod, clock))
    })
    .await;
    // A blank shard would start at clock 0 and refuse the workers' pushes.
    assert!(
        resumed.1 >= 20.0,
        "restarted shard 0 at clock {}, killed at {clock}",
        resumed.1
    );
    let done = wait_for_success(&cluster, "fashion-mnist-lan").await;
    let metric = done.status.unwrap().metric.unwrap();
    assert!(metric >= 0.83, "accuracy {metric} below the target 0.83");
    eprintln!(
        "shard 0 killed at clock {clock}, resumed at clock {}, job Succeeded at {metric:.4}",
        resumed.1
    );

    // Three datacenters in one cluster as one parameter server (LAN); the
    // example's Datacenters are all `local`, so their LoadBalancer peer
    // Services (no load balancer here) are not waited for. Its certificates
    // come from cert-manager's real controller (`spec.tls.issuerRef`).
    let cert_manager = CertManager::start(cluster.control_plane()).unwrap();
    CertManager::install_ca_issuer(cluster.control_plane()).unwrap();
    apply(
        &cluster,
        &with_issuer(&with_model(&example("bsp-3dc.yaml").unwrap(), "LAN")),
    );
    let name = "fashion-mnist-bsp";
    let done = wait_for_success(&cluster, name).await;
    let metric = done.status.unwrap().metric.unwrap();
    let secrets = Api::<Secret>::namespaced(cluster.client(), "default");
    let ps = secrets
        .get(&format!("{name}-eu-west-ps-tls"))
        .await
        .unwrap();
    assert_eq!(ps.annotations()["cert-manager.io/issuer-name"], CA_ISSUER);
    let own_ca = secrets.get_opt(&format!("{name}-ca")).await.unwrap();
    assert!(own_ca.is_none(), "the operator made a CA of its own");
    drop(cert_manager);
    eprintln!(
        "{name} as LAN over 3 datacenters, certificates by cert-manager, Succeeded at {metric:.4}"
    );
}

/// `manifest` with its TrainingJob's certificates issued by cert-manager's
/// [`CA_ISSUER`].
fn with_issuer(manifest: &str) -> String {
    let mut docs = yaml::documents(manifest).unwrap();
    for value in &mut docs {
        if value["kind"] == "TrainingJob" {
            value["spec"]["tls"] =
                json!({"issuerRef": {"name": CA_ISSUER, "kind": "ClusterIssuer"}});
        }
    }
    yaml::to_stream(&docs).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collaborative_job_runs_its_registry_and_sites_to_completion() {
    let data = data_cache(DatasetName::FashionMnist).unwrap();
    let images = geoml_images().unwrap();
    let cluster = Cluster::start("cartel", &images).await.unwrap();
    cluster.install_operator().await.unwrap();
    cluster.provide_data("default", &data).await.unwrap();

    let applied = Instant::now();
    // The example as it is: its Datacenters are all `local`.
    apply(&cluster, &example("cartel-fashion.yaml").unwrap());
    let done = wait_for_success(&cluster, "cartel-fashion").await;
    let pods = job_pods(&cluster, "cartel-fashion").await;
    let mut roles: Vec<(String, String)> = pods
        .iter()
        .map(|p| (p.labels()["geoml.io/role"].clone(), phase(p).to_owned()))
        .collect();
    roles.sort();
    let succeeded = |role: &str| (role.to_owned(), "Succeeded".to_owned());
    assert_eq!(
        roles,
        [
            succeeded("registry"),
            succeeded("site"),
            succeeded("site"),
            succeeded("site")
        ],
        "{:#?}",
        done.status
    );
    eprintln!(
        "cartel-fashion: registry and 3 sites Succeeded {:.1} s after apply",
        applied.elapsed().as_secs_f64()
    );
}
