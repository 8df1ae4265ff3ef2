//! Roles as the operator's pods run them: `geoml ps` and `geoml worker`
//! processes started one by one with a manifest and a topology file per
//! datacenter, no `geoml run` around them. They exit 0 on their own when
//! training is done, count the bytes of remote workers, and take SyncPolicy
//! edits of the manifest file while they run. Digits keeps each to seconds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ONE_RUN_AT_A_TIME, doc, example, free_port, set};
use geoml_crds::Topology;
use geoml_crds::metrics as names;
use geoml_dataplane::ps::durability::Durability;
use serde_json::Value;
use tokio::process::{Child, Command};

/// `gaia-3dc.yaml` without ap-southeast, on Digits, with inter-datacenter
/// model `model` and `workers` workers per datacenter, stopping after
/// `max_clocks`.
fn two_datacenters(model: &str, workers: i64, max_clocks: i64) -> Vec<Value> {
    let mut docs = example("gaia-3dc.yaml");
    docs.retain(|d| d["metadata"]["name"] != "ap-southeast");
    let policy = doc(&mut docs, "SyncPolicy");
    set(policy, "spec.interDatacenter.model", model.into());
    set(policy, "spec.significance.threshold", 0.1.into());
    set(policy, "spec.mirrorClockPeriod", 5.into());
    let job = doc(&mut docs, "TrainingJob");
    set(job, "spec.dataset.name", "Digits".into());
    set(job, "spec.model.learningRate", 0.1.into());
    set(
        job,
        "spec.stopping",
        geoml_crds::yaml::from_str(&format!("{{maxClocks: {max_clocks}}}")).unwrap(),
    );
    let datacenters = job["spec"]["datacenters"].as_array_mut().unwrap();
    datacenters.retain(|d| d["name"] != "ap-southeast");
    for d in datacenters {
        d["workers"] = workers.into();
    }
    docs
}

fn manifest_text(docs: &[Value]) -> String {
    geoml_crds::yaml::to_stream(docs).unwrap()
}

/// A job's processes on loopback, one shard per datacenter.
struct Job {
    dir: PathBuf,
    manifest: PathBuf,
    datacenters: Vec<String>,
    topologies: Vec<PathBuf>,
    /// gRPC and metrics address of each datacenter's shard.
    shards: Vec<(String, SocketAddr)>,
    children: Vec<(String, Child)>,
}

impl Job {
    /// Writes the manifest and a topology per datacenter; `global`: every
    /// worker uses every datacenter's shard (naive WAN BSP/SSP), else each
    /// shard mirrors the other.
    fn new(dir: &Path, docs: &[Value], global: bool) -> Self {
        let manifest = dir.join("manifest.yaml");
        std::fs::write(&manifest, manifest_text(docs)).unwrap();
        let datacenters = vec!["us-east".to_owned(), "eu-west".to_owned()];
        let shards: Vec<(String, SocketAddr)> = datacenters
            .iter()
            .map(|_| {
                (
                    format!("http://127.0.0.1:{}", free_port()),
                    SocketAddr::from(([127, 0, 0, 1], free_port())),
                )
            })
            .collect();
        let topologies = datacenters
            .iter()
            .enumerate()
            .map(|(d, name)| {
                let (parameter_servers, mirrors) = if global {
                    (
                        shards.iter().map(|s| s.0.clone()).collect(),
                        BTreeMap::new(),
                    )
                } else {
                    let other = 1 - d;
                    (
                        vec![shards[d].0.clone()],
                        BTreeMap::from([(
                            datacenters[other].clone(),
                            vec![shards[other].0.clone()],
                        )]),
                    )
                };
                let topology = Topology {
                    datacenter: name.clone(),
                    parameter_servers,
                    mirrors,
                    registry: None,
                };
                let path = dir.join(format!("topology-{name}.yaml"));
                std::fs::write(&path, topology.to_yaml().unwrap()).unwrap();
                path
            })
            .collect();
        Self {
            dir: dir.to_owned(),
            manifest,
            datacenters,
            topologies,
            shards,
            children: Vec::new(),
        }
    }

    fn spawn(&mut self, name: String, d: usize, args: &[String]) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_geoml"))
            .args(args)
            .arg(format!("--manifest={}", self.manifest.display()))
            .arg(format!("--topology={}", self.topologies[d].display()))
            // Digits is embedded: nothing to fetch, and nothing may be.
            .arg("--no-fetch")
            .arg("--insecure-plaintext")
            .arg(format!("--data-dir={}", self.dir.join("no-data").display()))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.children.push((name, child));
    }

    /// Starts each datacenter's shard (with a checkpoint directory) and
    /// waits until they answer.
    async fn start_parameter_servers(&mut self) {
        for d in 0..self.datacenters.len() {
            let (url, metrics) = self.shards[d].clone();
            let listen = url.trim_start_matches("http://").to_owned();
            let checkpoints = self.checkpoint_dir(d);
            self.spawn(
                format!("{}-ps-0", self.datacenters[d]),
                d,
                &[
                    "ps".into(),
                    "--shard=0".into(),
                    format!("--listen={listen}"),
                    format!("--metrics-listen={metrics}"),
                    format!("--checkpoint-dir={}", checkpoints.display()),
                ],
            );
        }
        for (_, metrics) in &self.shards {
            let deadline = Instant::now() + Duration::from_secs(60);
            while geoml_dataplane::metrics::scrape(*metrics).await.is_err() {
                assert!(Instant::now() < deadline, "a shard did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn start_workers(&mut self, per_datacenter: u32) {
        for d in 0..self.datacenters.len() {
            for index in 0..per_datacenter {
                self.spawn(
                    format!("{}-worker-{index}", self.datacenters[d]),
                    d,
                    &[
                        "worker".into(),
                        format!("--index={index}"),
                        "--eval-every=10".into(),
                    ],
                );
            }
        }
    }

    fn checkpoint_dir(&self, d: usize) -> PathBuf {
        self.dir
            .join(format!("{}-checkpoints", self.datacenters[d]))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits for every process to exit on its own; asserts each exited 0.
    /// Meanwhile scrapes the shards; returns the last value of `series`
    /// each one served.
    async fn wait_for_all(&mut self, within: Duration, series: &str) -> Vec<Option<f64>> {
        let deadline = Instant::now() + within;
        let mut last = vec![None; self.shards.len()];
        let mut running = self.children.len();
        while running > 0 {
            for (d, (_, metrics)) in self.shards.iter().enumerate() {
                if let Ok(text) = geoml_dataplane::metrics::scrape(*metrics).await {
                    last[d] = value(&text, series).or(last[d]);
                }
            }
            running = 0;
            for (name, child) in &mut self.children {
                match child.try_wait().unwrap() {
                    Some(status) => assert!(
                        status.success(),
                        "{name} exited with {status}:\n{}",
                        std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                            .unwrap_or_default()
                    ),
                    None => running += 1,
                }
            }
            if Instant::now() > deadline {
                let names: Vec<String> = self
                    .children
                    .iter_mut()
                    .filter_map(|(n, c)| c.try_wait().ok().flatten().is_none().then(|| n.clone()))
                    .collect();
                let logs: Vec<String> = names
                    .iter()
                    .map(|n| format!("{n}:\n{}", self.log(n)))
                    .collect();
                panic!(
                    "still running after {within:?}: {names:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    }
}

/// The value of the first sample of `series` in a `/metrics` text.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split(['{', ' ']).next() == Some(series))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.trim().parse().ok())
}

#[tokio::test]
async fn gaia_shards_and_workers_exit_0_by_themselves_after_draining_and_checkpointing() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let max_clocks = 60;
    let mut job = Job::new(dir.path(), &two_datacenters("ASP", 2, max_clocks), false);
    job.start_parameter_servers().await;
    job.start_workers(2);
    job.wait_for_all(Duration::from_secs(180), names::PS_CLOCK)
        .await;
    for d in 0..job.datacenters.len() {
        let name = format!("{}-ps-0", job.datacenters[d]);
        let log = job.log(&name);
        assert!(log.contains("training is done"), "{name}:\n{log}");
        // The final checkpoint holds the stopped model at the clock budget.
        let (_, recovered) = Durability::open(&job.checkpoint_dir(d), 10).unwrap();
        let checkpoint = recovered.checkpoint.expect("no checkpoint written");
        assert!(checkpoint.stopped, "{name}: {}", checkpoint.stop_reason);
        assert!(
            checkpoint
                .worker_clocks
                .iter()
                .all(|&c| c >= max_clocks.cast_unsigned()),
            "{name}: {:?}",
            checkpoint.worker_clocks
        );
    }
}

#[tokio::test]
async fn naive_wan_bsp_shards_count_the_bytes_of_remote_workers_and_exit_0() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut job = Job::new(dir.path(), &two_datacenters("BSP", 1, 40), true);
    job.start_parameter_servers().await;
    job.start_workers(1);
    let wan = job
        .wait_for_all(Duration::from_secs(180), names::PS_WAN_BYTES)
        .await;
    // Each shard serves one worker of its own datacenter and one remote one.
    for (d, bytes) in wan.iter().enumerate() {
        let bytes = bytes.unwrap_or(0.0);
        assert!(bytes > 0.0, "{}: {bytes} WAN bytes", job.datacenters[d]);
    }
}

#[tokio::test]
async fn gaia_shards_serve_no_wan_bytes_to_workers() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut job = Job::new(dir.path(), &two_datacenters("ASP", 1, 20), false);
    job.start_parameter_servers().await;
    job.start_workers(1);
    let wan = job
        .wait_for_all(Duration::from_secs(180), names::PS_WAN_BYTES)
        .await;
    assert_eq!(wan, [Some(0.0), Some(0.0)]);
}

/// Polls `series` of the shard at `metrics` until `ok` holds for it.
async fn wait_for_series(metrics: SocketAddr, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(text) = geoml_dataplane::metrics::scrape(metrics).await {
            last = value(&text, series);
            if last.is_some_and(&ok) {
                return last.unwrap_or_default();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{series} stayed at {last:?}");
}

#[tokio::test]
async fn running_shards_take_a_new_significance_threshold_from_the_rewritten_manifest() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut docs = two_datacenters("ASP", 1, 1000);
    let mut job = Job::new(dir.path(), &docs, false);
    job.start_parameter_servers().await;
    let close = |want: f64| move |v: f64| (v - want).abs() < 1e-9;
    for (_, metrics) in &job.shards {
        wait_for_series(*metrics, names::MIRROR_THRESHOLD, close(0.1)).await;
    }

    // A half-written file is no policy: the old one stays, the shards live.
    std::fs::write(&job.manifest, &manifest_text(&docs)[..200]).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (name, child) in &mut job.children {
        assert!(child.try_wait().unwrap().is_none(), "{name} exited");
    }
    for (_, metrics) in &job.shards {
        wait_for_series(*metrics, names::MIRROR_THRESHOLD, close(0.1)).await;
    }

    // The operator's rewrite: a new threshold, and a new inter-datacenter
    // model, which a running job cannot take.
    set(
        doc(&mut docs, "SyncPolicy"),
        "spec.significance.threshold",
        0.35.into(),
    );
    set(
        doc(&mut docs, "SyncPolicy"),
        "spec.interDatacenter.model",
        "FedAvg".into(),
    );
    // Atomically, as the kubelet swaps its `..data` link.
    let next = dir.path().join("manifest.yaml.next");
    std::fs::write(&next, manifest_text(&docs)).unwrap();
    std::fs::rename(&next, &job.manifest).unwrap();
    for (_, metrics) in &job.shards {
        wait_for_series(*metrics, names::MIRROR_THRESHOLD, close(0.35)).await;
    }
    let log = job.log("us-east-ps-0");
    assert!(log.contains("SyncPolicy change applied"), "{log}");
    assert!(log.contains("interDatacenter.model"), "{log}");
    assert!(log.contains("keeping the policy in effect"), "{log}");
}
