//! Operator benchmark (ignored by default; figures in docs/benchmarks.md):
//!
//! ```text
//! CARGO_TARGET_DIR=... cargo test -p geoml-operator --test bench -- --ignored --nocapture
//! ```
//!
//! One hub and two member control planes stand for three datacenters; the
//! `geoml-operator run` binary reconciles. It reports (1) the time from
//! creating a TrainingJob of 3 datacenters × (2 parameter servers + 8
//! workers) to every one of its objects existing, and (2) the operator's
//! resident memory once 200 TrainingJobs are reconciled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use geoml_crds::TrainingJob;
use geoml_tests::ControlPlane;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::json;

const DCS: [&str; 3] = ["dc-a", "dc-b", "dc-c"];

async fn create<K>(api: &Api<K>, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap();
}

fn job(name: &str, ps: i32, workers: i32) -> serde_json::Value {
    let datacenters: Vec<_> = DCS
        .iter()
        .map(|dc| json!({ "name": dc, "parameterServers": ps, "workers": workers }))
        .collect();
    json!({
        "apiVersion": "geoml.io/v1alpha1", "kind": "TrainingJob",
        "metadata": { "name": name, "namespace": "ml" },
        "spec": {
            "model": { "kind": "SoftmaxRegression" }, "dataset": { "name": "Digits" },
            "datacenters": datacenters, "syncPolicyRef": { "name": "gaia" },
        },
    })
}

async fn count<K>(client: &Client, selector: &str) -> usize
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), "ml")
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .len()
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test]
#[ignore = "benchmark: run with --ignored --nocapture"]
#[allow(clippy::too_many_lines)] // one benchmark, set-up included
async fn apply_to_objects_and_memory_with_200_jobs() {
    let (a, b, c) = tokio::join!(
        ControlPlane::start("dc-a"),
        ControlPlane::start("dc-b"),
        ControlPlane::start("dc-c")
    );
    let planes = [a.unwrap(), b.unwrap(), c.unwrap()];
    let hub = planes[0].client();
    planes[0].install_crds().await.unwrap();
    let clients: Vec<Client> = planes.iter().map(ControlPlane::client).collect();
    for client in &clients {
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({ "metadata": { "name": "ml" } }),
        )
        .await;
    }
    for (i, dc) in DCS.iter().enumerate() {
        let cluster = if i == 0 {
            json!({ "local": {} })
        } else {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(format!("{dc}-kubeconfig")),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    "kubeconfig".to_owned(),
                    ByteString(std::fs::read(planes[i].kubeconfig()).unwrap()),
                )])),
                ..Secret::default()
            };
            Api::<Secret>::namespaced(hub.clone(), "ml")
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
            json!({ "remote": { "kubeconfigSecretRef": { "name": format!("{dc}-kubeconfig"), "namespace": "ml" } } })
        };
        create(
            &Api::<geoml_crds::Datacenter>::all(hub.clone()),
            json!({ "apiVersion": "geoml.io/v1alpha1", "kind": "Datacenter", "metadata": { "name": dc },
                    "spec": { "region": dc, "cluster": cluster, "peerAccess": { "serviceType": "ClusterIP" } } }),
        )
        .await;
    }
    create(
        &Api::<geoml_crds::SyncPolicy>::namespaced(hub.clone(), "ml"),
        json!({ "apiVersion": "geoml.io/v1alpha1", "kind": "SyncPolicy", "metadata": { "name": "gaia" }, "spec": {} }),
    )
    .await;

    let mut operator = Command::new(env!("CARGO_BIN_EXE_geoml-operator"))
        .args([
            "run",
            "--listen=127.0.0.1:0",
            "--lease-namespace=ml",
            "--probe-seconds=5",
        ])
        .env("KUBECONFIG", planes[0].kubeconfig())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let pid = operator.id();
    tokio::time::sleep(Duration::from_secs(3)).await; // leader election and first connections
    let (idle_rss, _) = rss_kib(pid);

    // (1) Apply to all objects created: 3 × (2 PS + 8 workers).
    let jobs = Api::<TrainingJob>::namespaced(hub.clone(), "ml");
    let start = Instant::now();
    create(&jobs, job("big", 2, 8)).await;
    let selector = "geoml.io/job=big";
    loop {
        let mut done = true;
        for client in &clients {
            done &= count::<Pod>(client, selector).await == 10
                && count::<Service>(client, selector).await == 3
                && count::<ConfigMap>(client, selector).await == 1;
        }
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let apply_to_objects = start.elapsed();

    // (2) 200 more jobs of 3 × (1 PS + 2 workers): time until all are
    // Created, and the operator's memory then.
    let start = Instant::now();
    for i in 0..200 {
        create(&jobs, job(&format!("job-{i:03}"), 1, 2)).await;
    }
    loop {
        let created = jobs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|j| {
                j.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Created" && c.status == "True")
                })
            })
            .count();
        if created == 201 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_created = start.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss, peak) = rss_kib(pid);
    let mut pods = 0;
    for client in &clients {
        pods += count::<Pod>(client, "app.kubernetes.io/managed-by=geoml-operator").await;
    }
    println!(
        "apply → all objects, 3 DC × (2 PS + 8 workers): {} ms",
        apply_to_objects.as_millis()
    );
    println!(
        "200 jobs of 3 DC × (1 PS + 2 workers) → all Created: {:.1} s ({pods} pods in 3 clusters)",
        all_created.as_secs_f64()
    );
    println!(
        "operator RSS: idle {} MiB, with 201 jobs {} MiB (peak {} MiB)",
        idle_rss / 1024,
        rss / 1024,
        peak / 1024
    );
    operator.kill().unwrap();
    operator.wait().unwrap();
}
