//! TrainingJobs on real one-node clusters: the images this repository builds,
//! the operator running as a pod, `kubectl apply` of the examples, and the
//! jobs trained to `Succeeded` by real pods.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use geoml_crds::TrainingJob;
use geoml_crds::training_job::{DatasetName, JobPhase};
use geoml_tests::{Cluster, eventually_within, geoml_images};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

/// Longest a job may take from apply to a finished phase.
const TRAINING: Duration = Duration::from_secs(15 * 60);

/// The host's data cache with `name` in it: the volume the clusters' data
/// claims are bound to.
fn data_cache(name: DatasetName) -> std::path::PathBuf {
    let dir = geoml_runtime::data::default_cache_dir();
    geoml_runtime::data::load(name, &dir).unwrap();
    dir
}

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples").join(name);
    std::fs::read_to_string(path).unwrap()
}

/// Runs `cmd` (kubectl) with `stdin`, asserting success; returns stdout.
fn run(cmd: &mut Command, stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        let mut input = input;
        input.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let data = data_cache(DatasetName::FashionMnist);
    let images = geoml_images().unwrap();
    let cluster = Cluster::start("lan", &images).await.unwrap();
    cluster.install_operator().await.unwrap();
    cluster.provide_data("default", &data).await.unwrap();

    let applied = Instant::now();
    apply(&cluster, &example("fashion-mnist-lan.yaml"));
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

    // `kubectl get tj` shows the clock and the metric rising.
    let mut clocks = Vec::new();
    let mut metrics = Vec::new();
    let output = eventually_within(TRAINING, "the clock to rise twice", || {
        let out = run(cluster.kubectl().args(["get", "tj", "fashion-mnist-lan"]), None);
        let mut fields = out.lines().nth(1).unwrap_or("").split_whitespace();
        // NAME PHASE REASON DATACENTERS CLOCK METRIC WAN-BYTES AGE
        let clock = fields.nth(4).and_then(|c| c.parse::<i64>().ok());
        let metric = fields.next().and_then(|m| m.parse::<f64>().ok());
        if let Some(clock) = clock
            && clocks.last() != Some(&clock)
        {
            clocks.push(clock);
            metrics.extend(metric);
        }
        let done = clocks.len() >= 3;
        async move { done.then_some(out) }
    })
    .await;
    assert!(clocks.is_sorted(), "clocks {clocks:?} in\n{output}");

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
    assert!(pods.iter().all(|p| phase(p) == "Succeeded"), "{:?}", pods.iter().map(|p| (p.name_any(), phase(p).to_owned())).collect::<Vec<_>>());
    eprintln!(
        "fashion-mnist-lan: all pods Running {:.1} s after apply, Succeeded after {:.1} s, accuracy {metric:.4}, clocks seen {clocks:?}",
        running.as_secs_f64(),
        succeeded.as_secs_f64()
    );
}
