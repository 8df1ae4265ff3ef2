//! Gaia across emulated datacenters, with real processes: the selective
//! barrier, the mirror-clock bound, conservation of updates, and every mode
//! of `geoml compare`. Digits keeps each run to seconds.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_precision_loss
)] // test code; the counts are small

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{ONE_RUN_AT_A_TIME, doc, example, free_port, geoml, options, set, write};
use geoml_crds::identity::Role;
use geoml_crds::manifest::Manifest;
use geoml_dataplane::tls::{Expect, Transport};
use geoml_launcher::run::LocalRun;
use geoml_launcher::wan::control;
use geoml_launcher::wan::{FaultOp, Scope};
use geoml_proto as pb;
use geoml_proto::mirror::mirror_client::MirrorClient;
use geoml_proto::parameter_server_client::ParameterServerClient;
use geoml_proto::rows::{pack_indexes, pack_keys, pack_values, unpack_values};
use serde_json::Value;

/// `gaia-3dc.yaml` on Digits: `latency` ms per datacenter (ap-southeast
/// `slow_latency`), mirror clocks of `period` clocks, bound `bound`.
fn digits_gaia(latency: i64, slow_latency: i64, period: i64, bound: i64) -> Vec<Value> {
    let mut docs = example("gaia-3dc.yaml");
    for d in docs.iter_mut().filter(|d| d["kind"] == "Datacenter") {
        let slow = d["metadata"]["name"] == "ap-southeast";
        set(
            d,
            "spec.wan.latencyMs",
            if slow { slow_latency } else { latency }.into(),
        );
    }
    let policy = doc(&mut docs, "SyncPolicy");
    set(policy, "spec.significance.threshold", 0.1.into());
    set(policy, "spec.mirrorClockPeriod", period.into());
    set(policy, "spec.mirrorClockBound", bound.into());
    let job = doc(&mut docs, "TrainingJob");
    set(job, "spec.dataset.name", "Digits".into());
    set(job, "spec.model.learningRate", 0.1.into());
    set(
        job,
        "spec.stopping",
        geoml_crds::yaml::from_str("{maxClocks: 150}").unwrap(),
    );
    docs
}

/// A mirror client of the shard at `address`; roles started by hand here
/// use plaintext, those of a `LocalRun` the run's transport.
async fn mirror_client(
    address: &str,
    transport: &Transport,
) -> MirrorClient<tonic::transport::Channel> {
    let shard = Expect::role(Role::ParameterServer);
    MirrorClient::new(transport.connect(address, &shard).await.unwrap())
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Resumes a stopped process when dropped, so a failed test leaves none
/// stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

#[tokio::test]
async fn every_datacenter_ends_with_the_initial_model_plus_every_contribution_and_none_runs_ahead()
{
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let bound = 1;
    let mut docs = digits_gaia(10, 150, 2, bound);
    set(
        doc(&mut docs, "TrainingJob"),
        "spec.stopping",
        geoml_crds::yaml::from_str("{maxClocks: 2000}").unwrap(),
    );
    let manifest = write(dir.path(), &docs);
    let docs = Manifest::load(&manifest).unwrap();
    let job = docs.job().unwrap();
    let mut cluster = LocalRun::start(options(manifest.clone(), dir.path()), &job)
        .await
        .unwrap();
    let shards = cluster.parameter_server_addresses().len();
    assert_eq!(shards, 3, "one shard per datacenter");
    let clocks = async |cluster: &LocalRun, shards| {
        let mut clocks = Vec::new();
        for shard in 0..shards {
            let s = cluster.status(shard).await.unwrap();
            assert!(!s.stopped, "{s:?}");
            clocks.push(s.min_clock);
        }
        clocks
    };
    // Until every datacenter trains and has heard from the others.
    while clocks(&cluster, 3).await.iter().any(|&c| c < 20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // ap-southeast's parameter server stalls: its mirror clock stops where
    // it is, and the others must stop within DS mirror clocks (plus what a
    // round trip and a half to it takes at their pace) of it, not train on.
    let stalled = Resume(cluster.parameter_server_pid(2).unwrap());
    signal(stalled.0, "STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = clocks(&cluster, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(clocks(&cluster, 2).await, held, "the others trained on");
    drop(stalled);

    cluster.wait(None).await.unwrap();
    let snapshots = snapshots(cluster.parameter_server_addresses(), cluster.transport()).await;
    let (statuses, _) = cluster.shutdown().await.unwrap();
    assert_conserved(&job, &snapshots);
    for status in &statuses {
        let m = status.mirror.as_ref().unwrap();
        assert!(m.drained, "{status:?}");
        assert!(m.max_skew <= bound.cast_unsigned(), "{m:?}");
        assert!(
            m.elements_sent < m.elements_updated,
            "nothing was held back: {m:?}"
        );
    }
    for status in &statuses[..2] {
        assert!(
            status.mirror.as_ref().unwrap().clock_blocks > 0,
            "{status:?}"
        );
    }
}

#[tokio::test]
async fn with_int8_value_coding_every_datacenter_still_ends_with_every_contribution() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut docs = digits_gaia(10, 10, 2, 1);
    set(
        doc(&mut docs, "SyncPolicy"),
        "spec.valueCoding",
        "Int8".into(),
    );
    let manifest = write(dir.path(), &docs);
    let docs = Manifest::load(&manifest).unwrap();
    let job = docs.job().unwrap();
    let mut cluster = LocalRun::start(options(manifest.clone(), dir.path()), &job)
        .await
        .unwrap();
    cluster.wait(None).await.unwrap();
    let snapshots = snapshots(cluster.parameter_server_addresses(), cluster.transport()).await;
    let (statuses, _) = cluster.shutdown().await.unwrap();
    // What Int8 rounded off was carried and sent at the end, exactly.
    assert_conserved(&job, &snapshots);
    for status in &statuses {
        let m = status.mirror.as_ref().unwrap();
        assert!(m.drained, "{status:?}");
        assert!(m.elements_sent > 0, "{m:?}");
    }
}

/// Every shard's values and what its datacenter contributed: the updates
/// its own workers generated, less the peers' shares of what it held back
/// when training stopped.
async fn snapshots(addresses: &[String], transport: &Transport) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut snapshots = Vec::new();
    for address in addresses {
        let s = mirror_client(address, transport)
            .await
            .snapshot(pb::mirror::SnapshotRequest {})
            .await
            .unwrap()
            .into_inner();
        snapshots.push((
            unpack_values(&s.values).unwrap(),
            unpack_values(&s.generated).unwrap(),
        ));
    }
    snapshots
}

/// Conservation: every datacenter's model (one shard each) is the initial
/// model plus every datacenter's contribution (every update it sent while
/// training ran, and its share of what each held back when training
/// stopped), within float tolerance.
fn assert_conserved(
    job: &geoml_crds::manifest::ResolvedJob<'_>,
    snapshots: &[(Vec<f32>, Vec<f32>)],
) {
    // The initial model, as every shard builds it.
    let data = geoml_dataplane::data::load(
        job.job.spec.dataset.name,
        &geoml_dataplane::data::default_cache_dir(),
    )
    .unwrap();
    let model = geoml_dataplane::model::build(&job.job.spec.model, &data).unwrap();
    let mut initial = vec![0.0; model.layout().len()];
    for key in 0..model.layout().num_rows() as u32 {
        let range = model.layout().row(key).unwrap();
        model.init_row(key, 42, &mut initial[range]);
    }
    let mut expected = initial.clone();
    for (_, generated) in snapshots {
        assert!(
            generated.iter().any(|&g| g != 0.0),
            "a datacenter trained nothing"
        );
        for (e, g) in expected.iter_mut().zip(generated) {
            *e += g;
        }
    }
    for (d, (values, _)) in snapshots.iter().enumerate() {
        for (i, (v, e)) in values.iter().zip(&expected).enumerate() {
            assert!(
                (v - e).abs() <= 1e-3 * (1.0 + e.abs()),
                "datacenter {d}, element {i}: {v} != initial + all updates = {e}"
            );
        }
    }
}

#[tokio::test]
async fn a_parameter_server_killed_mid_run_loses_and_duplicates_no_update() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut docs = digits_gaia(5, 5, 2, 1);
    let job = doc(&mut docs, "TrainingJob");
    set(
        job,
        "spec.stopping",
        geoml_crds::yaml::from_str("{maxClocks: 300}").unwrap(),
    );
    set(
        job,
        "spec.checkpoint",
        geoml_crds::yaml::from_str("{intervalClocks: 10}").unwrap(),
    );
    let manifest = write(dir.path(), &docs);
    let docs = Manifest::load(&manifest).unwrap();
    let job = docs.job().unwrap();
    let mut cluster = LocalRun::start(options(manifest.clone(), dir.path()), &job)
        .await
        .unwrap();

    // eu-west's shard crashes mid-run, between two checkpoints, while
    // updates flow both ways.
    let clock_before = loop {
        let status = cluster.status(1).await.unwrap();
        if status.min_clock >= 45 {
            break status.min_clock;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.kill_parameter_server(1).await.unwrap();
    let killed = std::time::Instant::now();
    assert!(
        cluster.status(1).await.is_err(),
        "eu-west answers after SIGKILL"
    );
    // The others keep sending to it meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = std::time::Instant::now();
    cluster.restart_parameter_server(1).await.unwrap();
    let restored = cluster.status(1).await.unwrap();
    eprintln!(
        "eu-west killed at clock {clock_before}, restarted {:?} later, answering {:?} \
         after its restart at clock {}",
        restarted - killed,
        restarted.elapsed(),
        restored.min_clock
    );
    assert!(restored.min_clock >= clock_before);

    // Every worker finishes (no read stays blocked) and every shard drains.
    tokio::time::timeout(Duration::from_secs(240), cluster.wait(None))
        .await
        .expect("the run did not finish after the restart: a read stayed blocked")
        .unwrap();
    let snapshots = snapshots(cluster.parameter_server_addresses(), cluster.transport()).await;
    let (statuses, _) = cluster.shutdown().await.unwrap();
    for status in &statuses {
        assert_eq!(status.min_clock, 300, "{status:?}");
        assert!(status.mirror.as_ref().unwrap().drained, "{status:?}");
    }
    assert_conserved(&job, &snapshots);
    let log = std::fs::read_to_string(dir.path().join("logs/eu-west-ps-0.log")).unwrap();
    // The restarted shard's (the last) account of what it restored.
    let restored = log.lines().rfind(|l| l.contains("restored"));
    eprintln!("{}", restored.unwrap_or_else(|| panic!("{log}")));
}

/// How long the partition test cuts a datacenter off:
/// `GEOML_PARTITION_SECONDS` (default 10; `docs/benchmarks.md` records a
/// 60 s run).
fn partition() -> Duration {
    Duration::from_secs(
        std::env::var("GEOML_PARTITION_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )
}

/// Resident memory of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// The mirror status of every shard (one per datacenter).
async fn mirror_statuses(cluster: &LocalRun) -> Vec<pb::MirrorStatus> {
    let mut statuses = Vec::new();
    for shard in 0..cluster.parameter_server_addresses().len() {
        statuses.push(cluster.status(shard).await.unwrap().mirror.unwrap());
    }
    statuses
}

/// Bytes sent on the links to and from datacenter `cut`.
fn cut_links_bytes(statuses: &[pb::MirrorStatus], names: &[&str], cut: usize) -> u64 {
    let mut sent = 0;
    for (d, status) in statuses.iter().enumerate() {
        for peer in &status.peers {
            if d == cut || peer.datacenter == names[cut] {
                sent += peer.sent_bytes;
            }
        }
    }
    sent
}

/// Every shard's status and its process's resident memory.
async fn statuses_and_memory(cluster: &LocalRun) -> (Vec<pb::StatusResponse>, Vec<u64>) {
    let mut statuses = Vec::new();
    let mut memory = Vec::new();
    for shard in 0..cluster.parameter_server_addresses().len() {
        statuses.push(cluster.status(shard).await.unwrap());
        memory.push(resident_bytes(cluster.parameter_server_pid(shard).unwrap()));
    }
    (statuses, memory)
}

/// Waits, after the heal of datacenter `cut`, until every link to and from
/// it has been seen with nothing in flight and nothing queued (its backlog
/// from the cut delivered); the time that took and the bytes put on those
/// links meanwhile.
async fn catch_up(cluster: &LocalRun, names: &[&str], cut: usize) -> (Duration, u64) {
    let healed = std::time::Instant::now();
    let sent_at_heal = cut_links_bytes(&mirror_statuses(cluster).await, names, cut);
    let mut emptied = std::collections::BTreeSet::new();
    loop {
        let statuses = mirror_statuses(cluster).await;
        for (d, status) in statuses.iter().enumerate() {
            for peer in &status.peers {
                let involved = d == cut || peer.datacenter == names[cut];
                if involved && !peer.in_flight && peer.queued_elements == 0 {
                    emptied.insert((d, peer.datacenter.clone()));
                }
            }
        }
        // Three datacenters: two links each way between `cut` and the others.
        if emptied.len() == 4 {
            let sent = cut_links_bytes(&statuses, names, cut);
            return (healed.elapsed(), sent - sent_at_heal);
        }
        assert!(
            healed.elapsed() < Duration::from_secs(120),
            "not caught up 120 s after the heal: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three datacenters under Gaia on Digits, with a peer timeout of 2 s.
fn partition_job(cut_for: Duration) -> Vec<Value> {
    let mut docs = digits_gaia(5, 5, 2, 1);
    set(
        doc(&mut docs, "SyncPolicy"),
        "spec.interDatacenter.peerTimeoutSeconds",
        2.into(),
    );
    // Digits runs at about 100-200 clocks a second here: enough clocks to
    // train through the cut (the assertions hold either way).
    set(
        doc(&mut docs, "TrainingJob"),
        "spec.stopping",
        geoml_crds::yaml::from_str(&format!("{{maxClocks: {}}}", 200 + 200 * cut_for.as_secs()))
            .unwrap(),
    );
    docs
}

/// The WAN emulator cuts ap-southeast off mid-run under Gaia. The other two
/// datacenters keep training once the peer timeout passes, what waits for
/// ap-southeast stays in one coalesced queue per link, and after the heal
/// every update made anywhere arrives everywhere exactly once.
#[tokio::test]
async fn a_datacenter_cut_off_by_the_wan_holds_nobody_back_and_loses_nothing() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let cut_for = partition();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(dir.path(), &partition_job(cut_for));
    let docs = Manifest::load(&manifest).unwrap();
    let job = docs.job().unwrap();
    let names = ["us-east", "eu-west", "ap-southeast"];
    let cut = 2;
    let scope = Scope::Datacenter(names[cut].to_owned());
    let mut cluster = LocalRun::start(options(manifest.clone(), dir.path()), &job)
        .await
        .unwrap();
    let control = cluster.wan_control().unwrap();
    while cluster.status(cut).await.unwrap().min_clock < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elements = snapshots(
        &cluster.parameter_server_addresses()[..1],
        cluster.transport(),
    )
    .await[0]
        .0
        .len() as u64;

    let cut_at = std::time::Instant::now();
    control::apply(
        control,
        &FaultOp::Cut {
            scope: scope.clone(),
        },
    )
    .await
    .unwrap();
    // Past the peer timeout, the others count only each other.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (before, memory_before) = statuses_and_memory(&cluster).await;
    tokio::time::sleep(cut_for.saturating_sub(cut_at.elapsed() + Duration::from_secs(1))).await;
    let (during, memory_during) = statuses_and_memory(&cluster).await;
    let clocks = |statuses: &[pb::StatusResponse]| -> Vec<u64> {
        statuses.iter().map(|s| s.min_clock).collect()
    };
    eprintln!(
        "clocks {:?} -> {:?} during the cut; memory {memory_before:?} -> {memory_during:?}",
        clocks(&before),
        clocks(&during)
    );
    for d in 0..2 {
        let (was, is) = (&before[d], &during[d]);
        assert!(
            is.min_clock > was.min_clock || is.stopped,
            "{} stopped advancing while {} was cut off: {was:?} -> {is:?}",
            names[d],
            names[cut]
        );
        let mirror = is.mirror.as_ref().unwrap();
        for peer in &mirror.peers {
            assert_eq!(peer.reachable, peer.datacenter != names[cut], "{mirror:?}");
            // The update in flight and one coalesced queue behind it.
            assert!(
                peer.queued_elements <= 2 * elements,
                "{} elements queued for {}; the shard has {elements}",
                peer.queued_elements,
                peer.datacenter
            );
        }
    }
    for (d, (was, is)) in memory_before.iter().zip(&memory_during).enumerate() {
        assert!(
            *is < was + (64 << 20),
            "{}'s parameter server grew from {was} to {is} bytes during the cut",
            names[d]
        );
    }

    let healed = control::apply(control, &FaultOp::Heal { scope })
        .await
        .unwrap();
    assert!(healed.links.iter().all(|l| !l.fault.cut), "{healed:?}");
    let (caught_up, replayed) = catch_up(&cluster, &names, cut).await;
    eprintln!(
        "{} cut off for {cut_for:?}: its links' backlog delivered {caught_up:?} after the \
         heal, {replayed} bytes sent on them meanwhile",
        names[cut]
    );

    tokio::time::timeout(Duration::from_secs(240), cluster.wait(None))
        .await
        .expect("the run did not finish after the heal")
        .unwrap();
    let snapshots = snapshots(cluster.parameter_server_addresses(), cluster.transport()).await;
    let (statuses, _) = cluster.shutdown().await.unwrap();
    for status in &statuses {
        assert!(status.mirror.as_ref().unwrap().drained, "{status:?}");
    }
    assert_conserved(&job, &snapshots);
}

fn pull(keys: &[u32]) -> pb::PullRequest {
    pb::PullRequest {
        worker: 0,
        clock: 0,
        rows: Some(pb::Rows {
            keys: pack_keys(keys).into(),
            values: bytes::Bytes::new(),
            all: false,
        }),
    }
}

/// One shard of us-east in a two-datacenter ASP job; this test plays eu-west.
async fn lone_shard(dir: &Path) -> (tokio::process::Child, String) {
    let mut docs = digits_gaia(10, 10, 1000, 1);
    docs.retain(|d| d["metadata"]["name"] != "ap-southeast");
    let job = doc(&mut docs, "TrainingJob");
    let datacenters = job["spec"]["datacenters"].as_array_mut().unwrap();
    datacenters.retain(|d| d["name"] != "ap-southeast");
    let manifest = write(dir, &docs);
    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    let topology = dir.join("topology.yaml");
    // eu-west's mirror address leads nowhere: what us-east sends is lost,
    // which this test does not look at.
    std::fs::write(
        &topology,
        format!(
            "datacenter: us-east\nparameterServers: [{address}]\nmirrors:\n  eu-west: [http://127.0.0.1:{}]\n",
            free_port()
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(["ps", "--shard=0"])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--topology={}", topology.display()))
        .arg(format!("--manifest={}", manifest.display()))
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if ParameterServerClient::connect(address.clone())
            .await
            .is_ok()
        {
            return (child, address);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("geoml ps did not start");
}

/// `geoml ps` for datacenter `dc`'s shard on `port`, its mirror `peer` on
/// `peer_port`, checkpointing in `dir/dc`.
fn spawn_shard(
    dir: &Path,
    manifest: &Path,
    (dc, port): (&str, u16),
    (peer, peer_port): (&str, u16),
) -> tokio::process::Child {
    let topology = dir.join(format!("topology-{dc}.yaml"));
    std::fs::write(
        &topology,
        format!(
            "datacenter: {dc}\nparameterServers: [http://127.0.0.1:{port}]\nmirrors:\n  {peer}: [http://127.0.0.1:{peer_port}]\n"
        ),
    )
    .unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{dc}.log")))
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(["ps", "--shard=0", "--keep-serving"])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--topology={}", topology.display()))
        .arg(format!("--manifest={}", manifest.display()))
        .arg(format!("--checkpoint-dir={}", dir.join(dc).display()))
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn connect_ps(address: &str) -> ParameterServerClient<tonic::transport::Channel> {
    for _ in 0..300 {
        if let Ok(client) = ParameterServerClient::connect(address.to_owned()).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("geoml ps at {address} did not start");
}

/// Both workers of a datacenter push clocks `clocks` (dense gradients that
/// differ by element, clock and datacenter).
async fn train(
    ps: &mut ParameterServerClient<tonic::transport::Channel>,
    elements: usize,
    salt: usize,
    clocks: std::ops::RangeInclusive<u64>,
) {
    for clock in clocks {
        for worker in 0..2 {
            let gradient: Vec<f32> = (0..elements)
                .map(|i| ((i * 7 + clock as usize * 3 + salt) % 11) as f32 * 0.02 - 0.1)
                .collect();
            ps.push(pb::PushRequest {
                worker,
                clock,
                gradient: Some(pb::Rows {
                    keys: bytes::Bytes::new(),
                    values: pack_values(&gradient).into(),
                    all: true,
                }),
            })
            .await
            .unwrap();
        }
    }
}

async fn mirror_status(
    ps: &mut ParameterServerClient<tonic::transport::Channel>,
) -> pb::MirrorStatus {
    ps.status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .mirror
        .unwrap()
}

/// Two datacenters; the test plays their workers. eu-west stops answering
/// (its shard is killed) for longer than the peer timeout: us-east's reads
/// stop waiting for it, what us-east generates meanwhile waits for eu-west
/// in one coalesced queue, and once eu-west is back every update arrives
/// exactly once.
#[tokio::test]
async fn a_datacenter_that_stops_answering_holds_nobody_back_and_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut docs = digits_gaia(10, 10, 1, 1);
    docs.retain(|d| d["metadata"]["name"] != "ap-southeast");
    let job = doc(&mut docs, "TrainingJob");
    job["spec"]["datacenters"]
        .as_array_mut()
        .unwrap()
        .retain(|d| d["name"] != "ap-southeast");
    set(
        job,
        "spec.stopping",
        geoml_crds::yaml::from_str("{maxClocks: 40}").unwrap(),
    );
    set(
        job,
        "spec.checkpoint",
        geoml_crds::yaml::from_str("{intervalClocks: 4}").unwrap(),
    );
    let policy = doc(&mut docs, "SyncPolicy");
    set(policy, "spec.interDatacenter.peerTimeoutSeconds", 2.into());
    let manifest = write(dir.path(), &docs);
    let (us, eu) = (free_port(), free_port());
    let _us_east = spawn_shard(dir.path(), &manifest, ("us-east", us), ("eu-west", eu));
    let mut eu_west = spawn_shard(dir.path(), &manifest, ("eu-west", eu), ("us-east", us));
    let mut us_ps = connect_ps(&format!("http://127.0.0.1:{us}")).await;
    let mut eu_ps = connect_ps(&format!("http://127.0.0.1:{eu}")).await;
    let mut all = pull(&[]);
    all.rows = Some(pb::Rows {
        keys: bytes::Bytes::new(),
        values: bytes::Bytes::new(),
        all: true,
    });
    let elements = unpack_values(
        &us_ps
            .pull(all.clone())
            .await
            .unwrap()
            .into_inner()
            .rows
            .unwrap()
            .values,
    )
    .unwrap()
    .len();

    train(&mut us_ps, elements, 0, 1..=5).await;
    train(&mut eu_ps, elements, 1, 1..=5).await;
    eu_west.kill().await.unwrap();

    // us-east trains on; a read at clock 30 is 25 mirror clocks past
    // eu-west, far beyond the bound of 1: it waits only until eu-west has
    // been silent for the peer timeout.
    train(&mut us_ps, elements, 0, 6..=30).await;
    let mut read = all.clone();
    read.clock = 30;
    tokio::time::timeout(Duration::from_secs(60), us_ps.pull(read))
        .await
        .expect("a read stayed blocked by a datacenter that stopped answering")
        .unwrap();
    let status = mirror_status(&mut us_ps).await;
    let peer = &status.peers[0];
    assert_eq!(status.peers_reachable, 0, "{status:?}");
    assert!(!peer.reachable && peer.in_flight, "{peer:?}");
    // 25 clocks of updates wait in at most the update in flight and one
    // coalesced queue.
    assert!(
        peer.queued_elements <= 2 * elements as u64,
        "{} elements wait for eu-west; the shard has {elements}",
        peer.queued_elements
    );

    // eu-west comes back (from its checkpoint) and both train to the end.
    let _eu_west = spawn_shard(dir.path(), &manifest, ("eu-west", eu), ("us-east", us));
    let mut eu_ps = connect_ps(&format!("http://127.0.0.1:{eu}")).await;
    train(&mut eu_ps, elements, 1, 6..=40).await;
    train(&mut us_ps, elements, 0, 31..=40).await;
    let mut drained = false;
    for _ in 0..600 {
        let (us_status, eu_status) = (
            mirror_status(&mut us_ps).await,
            mirror_status(&mut eu_ps).await,
        );
        if us_status.drained && eu_status.drained {
            assert_eq!(
                us_status.peers_reachable, 0,
                "eu-west stopped: it holds nobody back"
            );
            assert!(us_status.peers[0].reachable, "{us_status:?}");
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        drained,
        "the datacenters did not exchange everything after eu-west came back"
    );
    let addresses = [
        format!("http://127.0.0.1:{us}"),
        format!("http://127.0.0.1:{eu}"),
    ];
    let snapshots = snapshots(&addresses, &Transport::Plaintext).await;
    let loaded = Manifest::load(&manifest).unwrap();
    assert_conserved(&loaded.job().unwrap(), &snapshots);
}

#[tokio::test]
async fn the_barrier_blocks_reads_of_announced_rows_only_until_their_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let (_child, address) = lone_shard(dir.path()).await;
    let mut ps = ParameterServerClient::connect(address.clone())
        .await
        .unwrap();
    let mut mirror = mirror_client(&address, &Transport::Plaintext).await;
    let before = ps.pull(pull(&[3])).await.unwrap().into_inner();
    let before = unpack_values(&before.rows.unwrap().values).unwrap();
    let width = before.len() as u32;

    // eu-west announces an update of row 3 (the shard holds every row, so
    // row 3's elements are 3·width .. 4·width).
    let indexes: Vec<u32> = (3 * width..4 * width).collect();
    mirror
        .announce(pb::mirror::Announcement {
            datacenter: "eu-west".into(),
            seq: 1,
            indexes: pack_indexes(&indexes),
            epoch: 1,
        })
        .await
        .unwrap();

    // Other rows stay readable.
    tokio::time::timeout(Duration::from_secs(5), ps.pull(pull(&[0, 1, 2, 4])))
        .await
        .expect("a read of rows nobody announced was held")
        .unwrap();
    // Row 3 waits.
    let mut blocked_client = ps.clone();
    let blocked = tokio::spawn(async move { blocked_client.pull(pull(&[2, 3])).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !blocked.is_finished(),
        "a read of an announced row went through"
    );

    mirror
        .update(pb::mirror::MirrorUpdate {
            datacenter: "eu-west".into(),
            seq: 1,
            indexes: pack_indexes(&indexes),
            deltas: pack_values(&vec![1.0; indexes.len()]),
            announced: true,
            round: 0,
            epoch: 1,
            ..pb::mirror::MirrorUpdate::default()
        })
        .await
        .unwrap();
    let released = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the read stayed blocked after the data arrived")
        .unwrap()
        .unwrap()
        .into_inner();
    let values = unpack_values(&released.rows.unwrap().values).unwrap();
    for (after, before) in values[width as usize..].iter().zip(&before) {
        assert!((after - before - 1.0).abs() < 1e-6, "{after} vs {before}");
    }

    // A stranger's update is refused and changes nothing.
    let refused = mirror
        .update(pb::mirror::MirrorUpdate {
            datacenter: "mars".into(),
            seq: 2,
            indexes: pack_indexes(&indexes),
            deltas: pack_values(&vec![1.0; indexes.len()]),
            announced: false,
            round: 0,
            epoch: 1,
            ..pb::mirror::MirrorUpdate::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let again = ps.pull(pull(&[3])).await.unwrap().into_inner();
    assert_eq!(
        unpack_values(&again.rows.unwrap().values).unwrap(),
        values[width as usize..]
    );
}

#[tokio::test]
async fn compare_runs_every_mode_and_reports_wan_bytes_only_where_the_wan_is_used() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut docs = digits_gaia(10, 10, 5, 1);
    set(
        doc(&mut docs, "TrainingJob"),
        "spec.stopping",
        geoml_crds::yaml::from_str("{maxClocks: 40}").unwrap(),
    );
    let manifest = write(dir.path(), &docs);
    let (json, svg) = (dir.path().join("out.json"), dir.path().join("out.svg"));
    let (ok, stdout, stderr) = geoml(&[
        "compare",
        manifest.to_str().unwrap(),
        "--modes=lan,bsp-wan,ssp-wan,gaia,fedavg,diloco,centralized,isolated",
        &format!("--json={}", json.display()),
        &format!("--plot={}", svg.display()),
        &format!("--work-dir={}", dir.path().join("runs").display()),
        "--eval-every=10",
    ])
    .await;
    assert!(ok, "{stdout}\n{stderr}");
    let comparison: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let modes = [
        ("lan", false),
        ("bsp-wan", true),
        ("ssp-wan", true),
        ("gaia", true),
        ("fedavg", true),
        ("diloco", true),
        ("centralized", true),
        ("isolated", false),
    ];
    for (mode, uses_wan) in modes {
        let report = &comparison["modes"][mode];
        assert_eq!(report["mode"], mode, "{comparison}");
        assert!(report["final_metric"].as_f64().unwrap() > 0.3, "{report}");
        let wan = report["wan_bytes_total"].as_u64().unwrap();
        assert_eq!(wan > 0, uses_wan, "{mode}: {wan} WAN bytes");
        assert!(stdout.contains(mode), "{stdout}");
    }
    assert!(
        comparison["modes"]["centralized"]["shipping_seconds"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        comparison["modes"]["gaia"]["updates_sent_fraction"]
            .as_f64()
            .unwrap()
            < 1.0
    );
    // One line per mode (2 px wide; axes and ticks are 1 px), each named in
    // the legend.
    let plot = std::fs::read_to_string(&svg).unwrap();
    let lines = plot
        .lines()
        .filter(|l| l.starts_with("<polyline") && l.contains(r#"stroke-width="2""#))
        .count();
    assert!(plot.starts_with("<svg") && lines == modes.len(), "{plot}");
    for (mode, _) in modes {
        assert!(plot.lines().any(|l| l.trim() == mode), "{mode}: {plot}");
    }
}

#[tokio::test]
async fn datacenters_evaluate_in_turn_until_one_met_the_target_then_each_at_every_chance() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let target = 0.9;
    let mut docs = digits_gaia(10, 10, 2, 1);
    set(
        doc(&mut docs, "TrainingJob"),
        "spec.stopping",
        geoml_crds::yaml::from_str(&format!("{{targetMetric: {target}, maxClocks: 2000}}"))
            .unwrap(),
    );
    let run_options = options(write(dir.path(), &docs), dir.path());
    let every = run_options.eval_every;
    let report = geoml_launcher::run::run(run_options).await.unwrap();
    assert!(report.time_to_target_seconds.is_some(), "{report:?}");
    let turns = report.per_datacenter.len() as u64;
    // When some datacenter's model first met the target (its report's
    // arrival; every datacenter runs on this machine's clock). Clocks do
    // not order it: a datacenter may run many clocks behind another.
    let first = report
        .per_datacenter
        .iter()
        .filter_map(|d| d.metric_history.iter().find(|s| s.metric >= target))
        .map(|s| s.seconds)
        .fold(f64::INFINITY, f64::min);
    let mut off_turn = 0;
    for (turn, dc) in report.per_datacenter.iter().enumerate() {
        for sample in &dc.metric_history {
            let in_turn =
                sample.clock % every == 0 && (sample.clock / every) % turns == turn as u64;
            assert!(
                in_turn || sample.seconds >= first,
                "{} evaluated out of turn at clock {} ({:.2} s), before any met the target ({first:.2} s)",
                dc.name,
                sample.clock,
                sample.seconds
            );
            // After it, the shards said so and every chance is taken.
            off_turn += usize::from(!in_turn && sample.clock % every == 0);
        }
    }
    assert!(off_turn > 0, "{:?}", report.per_datacenter);
}

/// How far from its budget a link's settled rate may be: the issue's ±15%.
const BUDGET_TOLERANCE: f64 = 0.15;

#[tokio::test]
async fn every_link_stays_near_its_budget_over_all_shards_and_the_target_is_still_reached() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // `gaia-3dc.yaml` (softmax on Fashion-MNIST) with two shards per
    // datacenter and ap-southeast on a 5 Mbit/s link: budgets of a tenth
    // of each link, 2 Mbit/s between us-east and eu-west and 0.5 Mbit/s to
    // and from ap-southeast, all below what Gaia's 1% sends (about
    // 7 Mbit/s a link, docs/benchmarks.md). The run goes on to its clock
    // budget, so that the rates settle; the target is measured meanwhile.
    let mut docs = example("gaia-3dc.yaml");
    for d in docs.iter_mut().filter(|d| d["kind"] == "Datacenter") {
        if d["metadata"]["name"] == "ap-southeast" {
            set(d, "spec.wan.bandwidthMbps", 5.into());
        }
    }
    let policy = doc(&mut docs, "SyncPolicy");
    set(
        policy,
        "spec.significance",
        geoml_crds::yaml::from_str("{threshold: 0.01, schedule: BandwidthBudget}").unwrap(),
    );
    set(policy, "spec.wanBudgetShare", 0.1.into());
    let job = doc(&mut docs, "TrainingJob");
    set(
        job,
        "spec.stopping",
        geoml_crds::yaml::from_str("{maxClocks: 1500}").unwrap(),
    );
    let datacenters = job["spec"]["datacenters"].as_array_mut().unwrap();
    for dc in datacenters {
        set(dc, "parameterServers", 2.into());
    }
    let mut run_options = options(write(dir.path(), &docs), dir.path());
    run_options.target = Some(0.83);
    let report = geoml_launcher::run::run(run_options).await.unwrap();
    println!("{}", report.table());
    assert!(
        report.time_to_target_seconds.is_some(),
        "never reached 0.83: {report:?}"
    );
    assert_eq!(report.wan_link_rates.len(), 6, "{report:?}");
    for link in &report.wan_link_rates {
        let budget = link.budget_bytes_per_second.unwrap();
        let expected = if link.from == "ap-southeast" || link.to == "ap-southeast" {
            0.5e6 / 8.0
        } else {
            2e6 / 8.0
        };
        assert!((budget - expected).abs() < 1e-6, "{link:?}");
        let error = link.settled_bytes_per_second / budget - 1.0;
        assert!(
            error.abs() <= BUDGET_TOLERANCE,
            "{} → {}: {:.0} B/s against a budget of {budget:.0} ({:+.0}%)",
            link.from,
            link.to,
            link.settled_bytes_per_second,
            100.0 * error
        );
    }
}
