//! Multi-process training on loopback: real `geoml ps` and `geoml worker`
//! processes (2 parameter servers, 4 workers) on real data sets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use common::{ONE_RUN_AT_A_TIME, doc, example, options, set, write};
use geoml_launcher::run::{LocalRun, Report, run};
use serde_json::Value;

/// The Fashion-MNIST example, changed by `edit`, run to completion.
async fn run_example(name: &str, edit: impl FnOnce(&mut Vec<Value>)) -> Report {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut docs = example(name);
    edit(&mut docs);
    let report = run(options(write(dir.path(), &docs), dir.path()))
        .await
        .unwrap();
    println!("{}", report.table());
    assert_eq!(report.parameter_servers, 2);
    assert_eq!(report.workers, 4);
    assert!(report.lan_bytes_total > 0);
    report
}

fn consistency(model: &str, staleness: Option<i64>) -> impl FnOnce(&mut Vec<Value>) {
    move |docs| {
        let policy = doc(docs, "SyncPolicy");
        set(policy, "spec.intraDatacenter.model", model.into());
        if let Some(s) = staleness {
            set(policy, "spec.intraDatacenter.staleness", s.into());
        }
    }
}

/// Every datacenter's evaluation met `target` (higher is better, or lower
/// for RMSE), and the final model, which also holds the updates pushed after
/// that evaluation, is within 0.01 of it.
fn reached(report: &Report, target: f64) {
    assert!(report.time_to_target_seconds.is_some(), "{report:?}");
    let final_metric = report.final_metric.unwrap();
    let off = if report.metric_name == "rmse" {
        final_metric - target
    } else {
        target - final_metric
    };
    assert!(off <= 0.01, "{report:?}");
}

#[tokio::test]
async fn softmax_on_fashion_mnist_reaches_0_83_with_bsp() {
    let report = run_example("fashion-mnist-lan.yaml", consistency("BSP", None)).await;
    reached(&report, 0.83);
    assert!(report.stop_reason.contains("target"), "{report:?}");
}

#[tokio::test]
async fn softmax_converges_with_ssp() {
    let report = run_example("fashion-mnist-lan.yaml", consistency("SSP", Some(3))).await;
    reached(&report, 0.83);
}

#[tokio::test]
async fn softmax_converges_asynchronously() {
    let report = run_example("fashion-mnist-lan.yaml", consistency("Async", None)).await;
    reached(&report, 0.83);
}

#[tokio::test]
async fn mlp_on_fashion_mnist_reaches_0_86() {
    let report = run_example("fashion-mnist-lan.yaml", |docs| {
        let job = doc(docs, "TrainingJob");
        set(job, "spec.model.kind", "MLP".into());
        set(
            job,
            "spec.model.hiddenUnits",
            geoml_crds::yaml::from_str("[128]").unwrap(),
        );
        set(job, "spec.model.learningRate", 0.1.into());
        set(job, "spec.stopping.targetMetric", 0.86.into());
        set(job, "spec.stopping.maxClocks", 3000.into());
    })
    .await;
    reached(&report, 0.86);
}

#[tokio::test]
async fn matrix_factorization_on_movielens_reaches_rmse_0_95() {
    let report = run_example("fashion-mnist-lan.yaml", |docs| {
        let job = doc(docs, "TrainingJob");
        set(
            job,
            "spec.model",
            geoml_crds::yaml::from_str("{kind: MatrixFactorization, rank: 16, learningRate: 0.5}")
                .unwrap(),
        );
        set(job, "spec.dataset.name", "MovieLens100K".into());
        set(job, "spec.stopping.targetMetric", 0.95.into());
        set(job, "spec.stopping.maxClocks", 6000.into());
    })
    .await;
    assert_eq!(report.metric_name, "rmse");
    reached(&report, 0.95);
}

#[tokio::test]
async fn a_killed_parameter_server_restarts_from_its_checkpoint_and_training_finishes() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let docs = example("fashion-mnist-lan.yaml");
    let manifest = write(dir.path(), &docs);
    let manifest_docs = geoml_crds::manifest::Manifest::load(&manifest).unwrap();
    let job = manifest_docs.job().unwrap();
    let mut cluster = LocalRun::start(options(manifest.clone(), dir.path()), &job)
        .await
        .unwrap();

    // Let it train past a checkpoint, then crash shard 1.
    let clock_before = loop {
        let status = cluster.status(1).await.unwrap();
        if status.min_clock >= 30 {
            break status.min_clock;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    cluster.kill_parameter_server(1).await.unwrap();
    assert!(
        cluster.status(1).await.is_err(),
        "shard 1 still answers after SIGKILL"
    );
    cluster.restart_parameter_server(1).await.unwrap();
    let restored = cluster.status(1).await.unwrap();
    // Nothing acknowledged was lost: the checkpoint plus the write-ahead log
    // bring back at least the clock it had reached.
    assert!(
        restored.min_clock >= clock_before,
        "restored {} < {clock_before}",
        restored.min_clock
    );

    cluster.wait(None).await.unwrap();
    let (statuses, _) = cluster.shutdown().await.unwrap();
    let last = statuses[0].metrics.last().unwrap();
    assert!(last.metric >= 0.83, "final accuracy {}", last.metric);
    let log = std::fs::read_to_string(dir.path().join("logs/lan-ps-1.log")).unwrap();
    assert!(log.contains("restored"), "{log}");
}
