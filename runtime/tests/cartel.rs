//! Cartel collaborative learning: drift detection on synthetic error
//! streams, the registry as a real process surviving a restart, and a
//! Collaborative job whose registry and sites are real processes talking
//! gRPC over loopback, and that exit 0 on their own once every site's
//! stream has ended.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use common::free_port;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use geoml_crds::mode::CollaborativeMode;
use geoml_dataplane::cartel::divergence::jensen_shannon;
use geoml_dataplane::cartel::drift::{Adwin, DriftDetector, WindowLimit};
use geoml_dataplane::cartel::site::SiteReport;
use geoml_dataplane::data::rng::SplitMix64;
use geoml_launcher::cartel::run_detailed;
use geoml_proto::cartel::registry_client::RegistryClient;
use geoml_proto::cartel::{NeighboursRequest, SiteMetadata, SitesRequest};
use serde_json::Value;

/// Error rate of a batch of 32 predictions, each wrong with probability `p`.
#[allow(clippy::cast_precision_loss)] // small counts
fn batch_error(rng: &mut SplitMix64, p: f64) -> f64 {
    let wrong = (0..32)
        .filter(|_| (rng.below(1_000_000) as f64) < p * 1e6)
        .count();
    wrong as f64 / 32.0
}

/// Feeds `stationary` batches at error rate 0.1, then batches at 0.8;
/// returns (false alarms, batches from the drift to the first detection).
fn alarms(
    detector: &mut dyn DriftDetector,
    stationary: usize,
    seed: u64,
) -> (usize, Option<usize>) {
    let mut rng = SplitMix64::new(seed);
    let false_alarms = (0..stationary)
        .filter(|_| detector.observe(batch_error(&mut rng, 0.1)))
        .count();
    let delay = (0..200).find(|_| detector.observe(batch_error(&mut rng, 0.8)));
    (false_alarms, delay)
}

#[test]
fn drift_detectors_fire_on_injected_drift_and_stay_quiet_on_stationary_data() {
    for seed in 0..5 {
        let (false_alarms, delay) = alarms(&mut WindowLimit::new(5, 0.4), 5_000, seed);
        assert_eq!(false_alarms, 0, "window/limit, seed {seed}");
        assert!(delay.is_some_and(|d| d < 5), "window/limit delay {delay:?}");

        let (false_alarms, delay) = alarms(&mut Adwin::new(0.002, 200), 5_000, seed);
        assert!(
            false_alarms <= 2,
            "ADWIN false alarms {false_alarms}, seed {seed}"
        );
        assert!(delay.is_some_and(|d| d < 20), "ADWIN delay {delay:?}");
    }
    // The windowed rule with a limit close to the base rate does raise
    // false alarms: the bound comes from the limit, not from luck.
    let (false_alarms, _) = alarms(&mut WindowLimit::new(5, 0.12), 5_000, 1);
    assert!(false_alarms > 10, "{false_alarms}");
}

#[test]
fn jensen_shannon_ranks_a_class_swap() {
    // Priors of a site over 9 classes before and after taking another's classes.
    let home = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let other = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0];
    let mixed: Vec<f64> = home
        .iter()
        .zip(&other)
        .map(|(a, b)| 0.2 * a + 0.8 * b)
        .collect();
    assert!(jensen_shannon(&mixed, &other) < jensen_shannon(&mixed, &home));
    assert!((jensen_shannon(&home, &other) - 1.0).abs() < 1e-12);
}

fn start_registry(port: u16, state: &Path) -> tokio::process::Child {
    start_registry_with(port, state, &[])
}

fn start_registry_with(port: u16, state: &Path, replicas: &[u16]) -> tokio::process::Child {
    let replicas: Vec<String> = replicas
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(["registry", &format!("--listen=127.0.0.1:{port}")])
        .arg(format!("--state-dir={}", state.display()))
        .arg(format!("--replicas={}", replicas.join(",")))
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn connect(port: u16) -> RegistryClient<tonic::transport::Channel> {
    for _ in 0..200 {
        if let Ok(client) = RegistryClient::connect(format!("http://127.0.0.1:{port}")).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("registry on port {port} did not answer");
}

fn site(name: &str, priors: &[f32], classes: &[u32]) -> SiteMetadata {
    SiteMetadata {
        site: name.into(),
        address: format!("http://127.0.0.1:1/{name}"),
        class_priors: priors.to_vec(),
        model_kind: "OnlineLinear".into(),
        model_bytes: 1234,
        batches: 7,
        classes: classes.to_vec(),
        ..SiteMetadata::default()
    }
}

#[tokio::test]
async fn a_restarted_registry_keeps_its_metadata_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut registry = start_registry(port, dir.path());
    let mut client = connect(port).await;
    for s in [
        site("a", &[0.5, 0.5, 0.0], &[0, 1]),
        site("b", &[0.0, 0.5, 0.5], &[1, 2]),
        site("c", &[0.45, 0.55, 0.0], &[0, 1]),
    ] {
        client.publish(s).await.unwrap();
    }
    let ask = NeighboursRequest {
        site: "a".into(),
        class_priors: vec![0.5, 0.5, 0.0],
        k: 1,
        ..NeighboursRequest::default()
    };
    let before = client.neighbours(ask.clone()).await.unwrap().into_inner();
    assert_eq!(before.neighbours.len(), 1);
    assert_eq!(before.neighbours[0].site, "c");
    let sites_before = client.sites(SitesRequest {}).await.unwrap().into_inner();

    // A crash, not a clean stop.
    registry.kill().await.unwrap();
    drop(client);
    let _registry = start_registry(port, dir.path());
    let mut client = connect(port).await;
    let sites_after = client.sites(SitesRequest {}).await.unwrap().into_inner();
    assert_eq!(sites_after, sites_before);
    assert_eq!(sites_after.sites.len(), 3);
    let after = client.neighbours(ask).await.unwrap().into_inner();
    assert_eq!(after, before);
}

#[tokio::test]
async fn a_registry_forwards_updates_to_its_replica() {
    let (primary_dir, replica_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (primary_port, replica_port) = (free_port(), free_port());
    let _replica = start_registry(replica_port, replica_dir.path());
    let _primary = start_registry_with(primary_port, primary_dir.path(), &[replica_port]);
    let mut replica = connect(replica_port).await;
    let mut primary = connect(primary_port).await;
    primary.publish(site("a", &[1.0, 0.0], &[0])).await.unwrap();
    let on_replica = replica.sites(SitesRequest {}).await.unwrap().into_inner();
    let on_primary = primary.sites(SitesRequest {}).await.unwrap().into_inner();
    assert_eq!(on_replica, on_primary);
    assert_eq!(on_replica.sites.len(), 1);
}

/// The Fashion-MNIST class-swap example, shorter: drifts at batches 150
/// (site a) and 200 (site c).
fn short_fashion_job(dir: &Path) -> std::path::PathBuf {
    let mut docs = common::example("cartel-fashion.yaml");
    let job = common::doc(&mut docs, "TrainingJob");
    common::set(job, "spec.stopping.maxClocks", Value::from(400));
    common::write(dir, &docs)
}

#[tokio::test]
async fn cartel_sites_borrow_class_blocks_and_move_no_raw_samples() {
    let _one = common::ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = short_fashion_job(dir.path());
    let options = common::options(manifest, dir.path());

    let (report, cartel, sites) = run_detailed(&options, CollaborativeMode::Cartel)
        .await
        .unwrap();
    assert_eq!(report.mode, "cartel");
    assert!(report.collaborative.adaptation_batches.is_some());
    // Sites a and c swap to site b's classes. Sites train at their own
    // pace, so either may drift first: the first to drift borrows from b,
    // and the other from b or from the one that swapped before it. Which
    // classes it borrows (b's, checked below) is what must hold.
    for (name, lenders) in [
        ("site-a", &["site-b", "site-c"][..]),
        ("site-c", &["site-a", "site-b"][..]),
    ] {
        let s = sites.iter().find(|s| s.site == name).unwrap();
        assert!(
            !s.transfers.is_empty(),
            "{name} borrowed nothing: detections {:?}, drifts {:?}, errors {:?}",
            s.detections,
            s.drifts,
            &s.errors[s.drifts[0] - 3..s.drifts[0] + 8]
        );
        let t = &s.transfers[0];
        assert!(
            lenders.contains(&t.from.as_str()),
            "{name} borrowed from {}",
            t.from
        );
        assert!(t.batch >= s.drifts[0], "borrowed before the drift: {t:?}");
        let got: BTreeSet<u16> = t.classes.iter().copied().collect();
        assert!(got.iter().all(|c| c % 3 == 1), "classes {got:?}");
    }
    // Only metadata, neighbour look-ups and model portions crossed sites,
    // and a transfer is the size of its weight blocks, not of any data.
    let kinds: BTreeSet<&str> = cartel.bytes_by_type.keys().map(String::as_str).collect();
    assert!(
        kinds.is_subset(&BTreeSet::from(["metadata", "neighbours", "portions"])),
        "{kinds:?}"
    );
    for t in sites.iter().flat_map(|s| &s.transfers) {
        let blocks = t.classes.len() as u64;
        // 784 pixels + bias as f32 per block, plus a little framing.
        assert!(t.bytes <= blocks * (785 * 4 + 16) + 64, "{t:?}");
    }
    assert_eq!(
        cartel.wan_bytes_total,
        cartel.bytes_by_type.values().sum::<u64>()
    );
    assert_eq!(report.wan_bytes_total, cartel.wan_bytes_total);

    // The same job isolated moves nothing and adapts no faster; centralized
    // moves raw samples.
    let (_, isolated, _) = run_detailed(&options, CollaborativeMode::Isolated)
        .await
        .unwrap();
    assert_eq!(isolated.wan_bytes_total, 0);
    assert_eq!(isolated.transfers, 0);
    assert!(
        cartel.adaptation_batches.unwrap() <= isolated.adaptation_batches.unwrap(),
        "cartel {:?} isolated {:?}",
        cartel.adaptation_batches,
        isolated.adaptation_batches
    );
    let (_, central, _) = run_detailed(&options, CollaborativeMode::Centralized)
        .await
        .unwrap();
    assert!(central.bytes_by_type.contains_key("raw_batch"));
    assert!(central.wan_bytes_total > 100 * cartel.wan_bytes_total);
    assert!(central.model_bytes > cartel.model_bytes);
}

/// Waits for `child` to exit, at most `within`; its status, or `None`.
async fn exit_within(
    child: &mut tokio::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    tokio::time::timeout(within, child.wait())
        .await
        .ok()
        .map(Result::unwrap)
}

fn finished(mut metadata: SiteMetadata) -> SiteMetadata {
    metadata.finished = true;
    metadata
}

#[tokio::test]
async fn a_registry_told_the_job_size_exits_zero_after_its_grace_once_every_site_finished() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut registry = tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(["registry", &format!("--listen=127.0.0.1:{port}")])
        .arg(format!("--state-dir={}", dir.path().display()))
        .args(["--exit-when-finished=2", "--exit-grace=2"])
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut client = connect(port).await;
    let a = site("a", &[1.0, 0.0], &[0]);
    let b = site("b", &[0.0, 1.0], &[1]);
    client.publish(a.clone()).await.unwrap();
    client.publish(b.clone()).await.unwrap();
    // One site finishing, even twice, is not every site.
    for _ in 0..2 {
        let reply = client.publish(finished(a.clone())).await.unwrap();
        assert_eq!(reply.into_inner().finished, 1);
    }
    assert!(
        exit_within(&mut registry, Duration::from_secs(3))
            .await
            .is_none()
    );

    let reply = client.publish(finished(b)).await.unwrap().into_inner();
    assert_eq!((reply.sites, reply.finished), (2, 2));
    let all_done = Instant::now();
    // During the grace it still answers, and says so.
    let listed = client.sites(SitesRequest {}).await.unwrap().into_inner();
    assert!(listed.sites.iter().all(|s| s.finished), "{listed:?}");
    let status = exit_within(&mut registry, Duration::from_secs(20))
        .await
        .expect("the registry did not exit after every site finished");
    assert!(status.success(), "{status}");
    assert!(all_done.elapsed() >= Duration::from_millis(1500));
}

/// The class-swap example on the embedded Digits data, short: a few
/// seconds of training per site.
fn short_digits_job(dir: &Path) -> PathBuf {
    let mut docs = common::example("cartel-fashion.yaml");
    let job = common::doc(&mut docs, "TrainingJob");
    common::set(job, "spec.dataset.name", Value::from("Digits"));
    common::set(job, "spec.stopping.maxClocks", Value::from(200));
    common::write(dir, &docs)
}

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// `geoml site` for `name` of `manifest`, logging to `dir`.
fn start_site(
    dir: &Path,
    manifest: &Path,
    name: &str,
    registry: u16,
    extra: &[&str],
) -> tokio::process::Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .arg("site")
        .arg(format!("--manifest={}", manifest.display()))
        .arg(format!("--site={name}"))
        .arg(format!("--listen=127.0.0.1:{}", free_port()))
        .arg(format!("--registry=http://127.0.0.1:{registry}"))
        .arg(format!("--report={}", report_path(dir, name).display()))
        .args(["--no-fetch", "--expect-sites=3", "--insecure-plaintext"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn report_path(dir: &Path, site: &str) -> PathBuf {
    dir.join(format!("{site}.json"))
}

fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Polls the processes until all exited (each 0) or `within` passed;
/// returns when each was seen to have exited (no earlier than it did), and
/// when each site's report was written.
async fn watch_exits(
    dir: &Path,
    children: &mut [(&str, tokio::process::Child)],
    within: Duration,
) -> (Vec<SystemTime>, Vec<SystemTime>) {
    let deadline = Instant::now() + within;
    let mut exits = vec![None; children.len()];
    while exits.iter().any(Option::is_none) {
        let now = SystemTime::now();
        for ((name, child), exit) in children.iter_mut().zip(&mut exits) {
            if exit.is_none()
                && let Some(status) = child.try_wait().unwrap()
            {
                *exit = Some(now);
                assert!(
                    status.success(),
                    "{name} exited {status}:\n{}",
                    log_of(dir, name)
                );
            }
        }
        let waiting: Vec<&str> = children
            .iter()
            .zip(&exits)
            .filter(|(_, e)| e.is_none())
            .map(|((n, _), _)| *n)
            .collect();
        assert!(
            Instant::now() < deadline,
            "still running after {within:?}: {waiting:?}\n{}",
            waiting
                .iter()
                .map(|n| log_of(dir, n))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reports are written under a temporary name and renamed.
    let reports = SITES
        .iter()
        .map(|site| {
            std::fs::metadata(report_path(dir, site))
                .and_then(|m| m.modified())
                .unwrap_or_else(|e| panic!("{site} exited 0 without a report: {e}"))
        })
        .collect();
    (exits.into_iter().map(Option::unwrap).collect(), reports)
}

fn read_report(dir: &Path, site: &str) -> SiteReport {
    serde_json::from_str(&std::fs::read_to_string(report_path(dir, site)).unwrap()).unwrap()
}

#[tokio::test]
async fn a_collaborative_jobs_registry_and_sites_all_exit_zero_on_their_own_after_every_stream() {
    let _one = common::ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = short_digits_job(dir.path());
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
    // The defaults a pod gets: sites poll every second, the registry keeps
    // answering 5 s once every site finished.
    let registry = tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(["registry", &format!("--listen=127.0.0.1:{port}")])
        .arg(format!(
            "--state-dir={}",
            dir.path().join("state").display()
        ))
        .arg("--exit-when-finished=3")
        .arg("--insecure-plaintext")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut children = vec![("registry", registry)];
    for name in SITES {
        children.push((name, start_site(dir.path(), &manifest, name, port, &[])));
    }
    let (exits, reports) = watch_exits(dir.path(), &mut children, Duration::from_secs(300)).await;

    // Nobody left before every stream had ended: a finished site kept
    // serving its model exchange for the others, the registry outlived the
    // sites.
    let last_report = *reports.iter().max().unwrap();
    let registry_exit = exits[0];
    for (name, at) in children.iter().map(|(n, _)| n).zip(&exits) {
        assert!(
            *at >= last_report,
            "{name} exited before every site finished"
        );
        assert!(registry_exit >= *at, "the registry exited before {name}");
    }
    // It kept answering for its grace.
    assert!(registry_exit.duration_since(last_report).unwrap() >= Duration::from_secs(4));
    for site in SITES {
        let report = read_report(dir.path(), site);
        assert_eq!(
            report.accuracy.len(),
            200,
            "{site} trained part of its stream"
        );
        assert_eq!(report.errors.len(), 200, "{site}");
        assert!(report.bytes_by_type.contains_key("metadata"), "{site}");
        // It heard from the registry that all were done, rather than
        // giving up on a registry gone.
        let log = log_of(dir.path(), site);
        assert!(log.contains("every site finished"), "{site}:\n{log}");
    }
}

#[tokio::test]
async fn finished_sites_exit_zero_once_the_registry_is_gone() {
    let _one = common::ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = short_digits_job(dir.path());
    let port = free_port();
    let mut registry = start_registry(port, &dir.path().join("state"));
    let mut client = connect(port).await;
    // site-c never runs: the two others wait for it after their streams.
    client.publish(site("site-c", &[], &[])).await.unwrap();
    let mut children: Vec<_> = ["site-a", "site-b"]
        .into_iter()
        .map(|name| {
            let extra = ["--registry-grace=1", "--finish-poll=0.2"];
            (name, start_site(dir.path(), &manifest, name, port, &extra))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let listed = client.sites(SitesRequest {}).await.unwrap().into_inner();
        if listed.sites.iter().filter(|s| s.finished).count() == 2 {
            break;
        }
        for (name, child) in &mut children {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{name} exited while site-c had not finished:\n{}",
                log_of(dir.path(), name)
            );
        }
        assert!(Instant::now() < deadline, "the sites did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Finished, they keep waiting for site-c...
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, child) in &mut children {
        assert!(child.try_wait().unwrap().is_none(), "{name} left early");
    }
    // ... until the registry is gone, which it only is once all finished.
    registry.kill().await.unwrap();
    for (name, child) in &mut children {
        let status = exit_within(child, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("{name} still runs without a registry"));
        assert!(
            status.success(),
            "{name}: {status}\n{}",
            log_of(dir.path(), name)
        );
        assert_eq!(read_report(dir.path(), name).accuracy.len(), 200, "{name}");
    }
}
