//! Cartel collaborative learning: drift detection on synthetic error
//! streams, the registry as a real process surviving a restart, and a
//! Collaborative job whose registry and sites are real processes talking
//! gRPC over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use geoml_runtime::cartel::divergence::jensen_shannon;
use geoml_runtime::cartel::drift::{Adwin, DriftDetector, WindowLimit};
use geoml_runtime::cartel::pb::registry_client::RegistryClient;
use geoml_runtime::cartel::pb::{NeighboursRequest, SiteMetadata, SitesRequest};
use geoml_runtime::cartel::{Mode, run_detailed};
use geoml_runtime::data::rng::SplitMix64;
use serde_yaml::Value;

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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

    let (report, cartel, sites) = run_detailed(&options, Mode::Cartel).await.unwrap();
    assert_eq!(report.mode, "cartel");
    assert!(report.collaborative.adaptation_batches.is_some());
    // Sites a and c swap to site b's classes. Site a borrows from b; by
    // the time site c drifts, site a sees b's classes too, so either is a
    // closest neighbour of c.
    for (name, lenders) in [
        ("site-a", &["site-b"][..]),
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
    let (_, isolated, _) = run_detailed(&options, Mode::Isolated).await.unwrap();
    assert_eq!(isolated.wan_bytes_total, 0);
    assert_eq!(isolated.transfers, 0);
    assert!(
        cartel.adaptation_batches.unwrap() <= isolated.adaptation_batches.unwrap(),
        "cartel {:?} isolated {:?}",
        cartel.adaptation_batches,
        isolated.adaptation_batches
    );
    let (_, central, _) = run_detailed(&options, Mode::Centralized).await.unwrap();
    assert!(central.bytes_by_type.contains_key("raw_batch"));
    assert!(central.wan_bytes_total > 100 * cartel.wan_bytes_total);
    assert!(central.model_bytes > cartel.model_bytes);
}
