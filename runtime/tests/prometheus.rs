//! A real Prometheus server (Debian's package, fetched by
//! `tests/tools/prometheus.sh`) scrapes a Gaia run across three emulated
//! datacenters, and the metrics the issue names answer its queries.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap
)] // test code; the counts are small

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::{ONE_RUN_AT_A_TIME, doc, example, free_port, options, repo_root, set, write};
use geoml_crds::manifest::Manifest;
use geoml_launcher::run::LocalRun;
use geoml_tests::prometheus;
use serde_json::Value;

fn prometheus_binary() -> String {
    let output = std::process::Command::new("bash")
        .arg(repo_root().join("tests/tools/prometheus.sh"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "tests/tools/prometheus.sh failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The samples of PromQL `promql` now.
async fn query(addr: SocketAddr, promql: &str) -> Vec<Value> {
    prometheus::query(addr, promql, None).await.unwrap()
}

fn value(sample: &Value) -> f64 {
    prometheus::value(sample).unwrap()
}

/// A Prometheus server scraping `endpoints` every 200 ms, once it is ready.
async fn start_prometheus(
    binary: &str,
    dir: &std::path::Path,
    endpoints: &[SocketAddr],
) -> (tokio::process::Child, SocketAddr) {
    let targets: Vec<String> = endpoints.iter().map(|a| format!("'{a}'")).collect();
    let config = format!(
        "global: {{scrape_interval: 200ms, scrape_timeout: 150ms}}\n\
         scrape_configs:\n- job_name: geoml\n  static_configs:\n  - targets: [{}]\n",
        targets.join(", ")
    );
    let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let server = prometheus::start(&[], binary, dir, &config, address)
        .await
        .unwrap();
    (server, address)
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one Gaia run, its series checked one after the other
async fn prometheus_scrapes_wan_mirror_and_barrier_metrics_of_a_gaia_run() {
    let binary = prometheus_binary();
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut docs = example("gaia-3dc.yaml");
    for d in docs.iter_mut().filter(|d| d["kind"] == "Datacenter") {
        set(d, "spec.wan.latencyMs", 10.into());
    }
    let policy = doc(&mut docs, "SyncPolicy");
    let example_threshold = policy["spec"]["significance"]["threshold"]
        .as_f64()
        .unwrap();
    set(policy, "spec.mirrorClockPeriod", 5.into());
    let job = doc(&mut docs, "TrainingJob");
    set(job, "spec.dataset.name", "Digits".into());
    set(job, "spec.model.learningRate", 0.1.into());
    set(
        job,
        "spec.stopping",
        geoml_crds::yaml::from_str("{maxClocks: 300}").unwrap(),
    );
    let manifest = write(dir.path(), &docs);
    let loaded = Manifest::load(&manifest).unwrap();
    let job = loaded.job().unwrap();
    let mut cluster = LocalRun::start(options(manifest.clone(), dir.path()), &job)
        .await
        .unwrap();

    let endpoints = cluster.metrics_endpoints();
    assert_eq!(
        endpoints.len(),
        4,
        "three parameter servers and the WAN proxy"
    );
    let (_server, prometheus) = start_prometheus(&binary, dir.path(), &endpoints).await;

    cluster.wait(None).await.unwrap();
    // The parameter servers serve until shutdown: wait for scrapes of all
    // four endpoints that see the final counts.
    let mut up = Vec::new();
    for _ in 0..100 {
        up = query(prometheus, "up == 1").await;
        if up.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let targets = prometheus::get(prometheus, "/api/v1/targets", &[])
        .await
        .ok();
    assert_eq!(up.len(), 4, "{up:?}\n{targets:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // WAN bytes per directed link: six links among three datacenters.
    let links = query(prometheus, "geoml_wan_bytes_total").await;
    assert_eq!(links.len(), 6, "{links:?}");
    assert!(links.iter().all(|s| value(s) > 0.0), "{links:?}");
    // Mirror bytes per link as the shards count them: six links, each
    // delivered no more than it was handed, and no more than the emulated
    // WAN carried.
    let by_link = "sum by (datacenter, peer)";
    let handed = query(
        prometheus,
        &format!("{by_link} (geoml_mirror_link_sent_bytes_total)"),
    )
    .await;
    let delivered = query(
        prometheus,
        &format!("{by_link} (geoml_mirror_link_delivered_bytes_total)"),
    )
    .await;
    assert_eq!(
        (handed.len(), delivered.len()),
        (6, 6),
        "{handed:?} {delivered:?}"
    );
    for d in &delivered {
        let h = handed
            .iter()
            .find(|h| h["metric"] == d["metric"])
            .unwrap_or_else(|| panic!("no sent bytes for {d:?}"));
        assert!(value(d) > 0.0 && value(d) <= value(h), "{d:?} {h:?}");
    }
    let carried: f64 = links.iter().map(value).sum();
    let delivered_total: f64 = delivered.iter().map(value).sum();
    assert!(delivered_total <= carried, "{delivered_total} > {carried}");
    // LAN bytes per datacenter and direction.
    let lan = query(
        prometheus,
        "sum by (datacenter) (geoml_ps_lan_received_bytes_total)",
    )
    .await;
    assert_eq!(lan.len(), 3, "{lan:?}");
    // Updates filtered vs sent: the filter held some back.
    let sent = query(prometheus, "sum(geoml_mirror_elements_sent_total)").await;
    let made = query(prometheus, "sum(geoml_mirror_elements_updated_total)").await;
    assert!(
        value(&sent[0]) > 0.0 && value(&sent[0]) < value(&made[0]),
        "{sent:?} {made:?}"
    );
    // Each datacenter's model was evaluated.
    let metric = query(prometheus, "geoml_ps_metric").await;
    assert!(
        metric.len() == 3 && metric.iter().all(|s| value(s) > 0.3),
        "{metric:?}"
    );
    let threshold = query(prometheus, "geoml_mirror_threshold").await;
    assert!(
        threshold
            .iter()
            .all(|s| (value(s) - example_threshold).abs() < 1e-9),
        "{threshold:?}"
    );
    // Mirror clocks per datacenter, and what each heard from its peers.
    let clocks = query(prometheus, "geoml_mirror_clock").await;
    assert_eq!(clocks.len(), 3, "{clocks:?}");
    assert!(clocks.iter().all(|s| value(s) >= 59.0), "{clocks:?}");
    let heard = query(prometheus, "geoml_mirror_peer_clock").await;
    assert_eq!(heard.len(), 6, "{heard:?}");
    let skew = query(prometheus, "max(geoml_mirror_max_skew)").await;
    assert!(value(&skew[0]) <= 1.0, "{skew:?}");
    let rtt = query(prometheus, "min(geoml_mirror_rtt_seconds)").await;
    assert!(
        value(&rtt[0]) >= 0.01,
        "RTT below the emulated 20 ms: {rtt:?}"
    );
    // Barrier counters exist for every shard, whether or not they fired.
    for metric in [
        "geoml_mirror_barrier_blocks_total",
        "geoml_mirror_barrier_wait_seconds_total",
        "geoml_mirror_clock_blocks_total",
    ] {
        assert_eq!(query(prometheus, metric).await.len(), 3, "{metric}");
    }
    cluster.shutdown().await.unwrap();
}
