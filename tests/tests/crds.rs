//! The geoml CRDs against a real kube-apiserver: they install, document
//! themselves in `kubectl explain`, accept the examples, reject invalid
//! objects naming the field, apply defaults and print their columns.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use geoml_crds::{TrainingJob, TrainingJobStatus};
use geoml_tests::ControlPlane;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn plane_with_crds(name: &str) -> ControlPlane {
    let plane = ControlPlane::start(name).await.unwrap();
    plane.install_crds().await.unwrap();
    plane
}

/// `kubectl explain` reads the OpenAPI the apiserver publishes a moment after
/// a CRD is Established; retry until it has caught up.
fn explain(plane: &ControlPlane, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = plane.kubectl().args(["explain", what]).output().unwrap();
        if out.status.success() || Instant::now() > deadline {
            assert!(
                out.status.success(),
                "kubectl explain {what}: {}",
                text(&out)
            );
            return text(&out);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test]
async fn crds_become_established_and_kubectl_explain_prints_field_docs() {
    let plane = plane_with_crds("explain").await;

    let spec = explain(&plane, "trainingjob.spec");
    for expected in [
        "syncPolicyRef",
        "The SyncPolicy, in the job's namespace",
        "datacenters",
        "At least one; names are unique",
        "runPolicy",
    ] {
        assert!(
            spec.contains(expected),
            "{expected:?} missing from:\n{spec}"
        );
    }
    let threshold = explain(&plane, "syncpolicy.spec.significance.threshold");
    assert!(
        threshold.contains("Initial threshold, in (0, 1]"),
        "{threshold}"
    );
    let cluster = explain(&plane, "datacenter.spec.cluster");
    assert!(cluster.contains("exactly one of"), "{cluster}");
}

#[tokio::test]
async fn every_example_passes_a_server_side_dry_run_apply() {
    let plane = plane_with_crds("examples").await;
    let examples = yaml_files(&repo_root().join("manifests/examples"));
    assert!(examples.len() >= 4, "examples: {examples:?}");
    for file in &examples {
        let out = plane
            .kubectl()
            .args([
                "apply",
                "--server-side",
                "--dry-run=server",
                "--validate=strict",
                "-f",
            ])
            .arg(file)
            .output()
            .unwrap();
        let printed = text(&out);
        assert!(out.status.success(), "{}: {printed}", file.display());
        for kind in ["datacenter", "syncpolicy", "trainingjob"] {
            assert!(
                printed.contains(&format!("{kind}.geoml.io/")),
                "{}: no {kind} in:\n{printed}",
                file.display()
            );
        }
        assert!(printed.contains("(server dry run)"), "{printed}");
        // Each example also resolves as `geoml run` reads it.
        let manifest = geoml_crds::manifest::Manifest::load(file).unwrap();
        manifest.job().unwrap();
    }
    let trainingjobs = plane
        .kubectl()
        .args(["get", "tj", "-A", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        trainingjobs.stdout.is_empty(),
        "a dry run created objects: {}",
        text(&trainingjobs)
    );
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_the_offending_field_named() {
    let plane = plane_with_crds("invalid").await;
    let fixtures = yaml_files(&repo_root().join("tests/fixtures/invalid"));
    assert!(
        fixtures.len() >= 12,
        "only {} invalid fixtures",
        fixtures.len()
    );

    let mut wrong = Vec::new();
    for file in &fixtures {
        let source = std::fs::read_to_string(file).unwrap();
        let expected = source
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect: FIELD' line", file.display()));
        let out = plane
            .kubectl()
            .args(["apply", "--server-side", "--validate=strict", "-f"])
            .arg(file)
            .output()
            .unwrap();
        let printed = text(&out);
        if out.status.success() {
            wrong.push(format!("{}: accepted:\n{printed}", file.display()));
        } else if !printed.contains(expected) {
            wrong.push(format!(
                "{}: error does not name {expected}:\n{printed}",
                file.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n\n"));

    // Nothing of what was rejected exists.
    let all = plane
        .kubectl()
        .args(["get", "tj,sp,dc", "-A", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        all.status.success() && all.stdout.is_empty(),
        "{}",
        text(&all)
    );
}

#[tokio::test]
async fn defaults_fill_in_what_the_user_left_out() {
    let plane = plane_with_crds("defaults").await;
    // Only what a user must write; the apiserver fills in the rest.
    let user_wrote = json!({
        "apiVersion": "geoml.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "minimal"},
        "spec": {
            "model": {"kind": "SoftmaxRegression"},
            "dataset": {"name": "FashionMNIST"},
            "datacenters": [{"name": "us-east"}],
            "syncPolicyRef": {"name": "gaia"}
        }
    });
    let rust_defaults: TrainingJob = serde_json::from_value(user_wrote.clone()).unwrap();
    let untyped: Api<DynamicObject> = Api::namespaced_with(
        plane.client(),
        "default",
        &ApiResource::erase::<TrainingJob>(&()),
    );
    untyped
        .create(
            &PostParams::default(),
            &serde_json::from_value(user_wrote).unwrap(),
        )
        .await
        .unwrap();
    let jobs: Api<TrainingJob> = Api::namespaced(plane.client(), "default");
    let stored = jobs.get("minimal").await.unwrap();
    // What the apiserver defaulted equals what the Rust types default to.
    assert_eq!(stored.spec, rust_defaults.spec);
    let stored = serde_json::to_value(&stored.spec).unwrap();
    assert_eq!(stored["runPolicy"]["backoffLimit"], 3);
    assert_eq!(stored["runPolicy"]["cleanPodPolicy"], "Running");
    assert_eq!(stored["datacenters"][0]["parameterServers"], 1);
    assert_eq!(stored["model"]["optimizer"], "SGD");
    assert_eq!(stored["stopping"]["maxClocks"], 100);
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let plane = plane_with_crds("columns").await;
    let example = repo_root().join("manifests/examples/gaia-3dc.yaml");
    let out = plane
        .kubectl()
        .args(["apply", "--server-side", "-f"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let jobs: Api<TrainingJob> = Api::namespaced(plane.client(), "default");
    let status = TrainingJobStatus {
        phase: Some(geoml_crds::training_job::JobPhase::Running),
        reason: Some("AllDatacentersTraining".into()),
        datacenters_ready: Some("3/3".into()),
        clock: Some(42),
        metric: Some(0.815),
        wan_bytes: Some(123_456),
        ..TrainingJobStatus::default()
    };
    jobs.patch_status(
        "fashion-mnist-gaia",
        &PatchParams::apply("geoml-tests").force(),
        &Patch::Apply(json!({
            "apiVersion": "geoml.io/v1alpha1",
            "kind": "TrainingJob",
            "status": status,
        })),
    )
    .await
    .unwrap();

    let out = plane.kubectl().args(["get", "tj"]).output().unwrap();
    let table = text(&out);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "PHASE",
            "REASON",
            "DATACENTERS",
            "CLOCK",
            "METRIC",
            "WAN-BYTES",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        row[..7],
        [
            "fashion-mnist-gaia",
            "Running",
            "AllDatacentersTraining",
            "3/3",
            "42",
            "0.815",
            "123456"
        ]
    );

    let out = plane.kubectl().args(["get", "dc"]).output().unwrap();
    let table = text(&out);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "REGION", "ACTIVE", "AGE"]);
    assert!(table.contains("eu-west-1"), "{table}");
}

#[tokio::test]
async fn several_control_planes_run_side_by_side() {
    let (a, b) = tokio::join!(ControlPlane::start("dc-a"), ControlPlane::start("dc-b"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.server(), b.server());
    let only_in_a = Namespace {
        metadata: ObjectMeta {
            name: Some("only-in-a".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(a.client())
        .create(&PostParams::default(), &only_in_a)
        .await
        .unwrap();
    assert!(
        Api::<Namespace>::all(a.client())
            .get_opt("only-in-a")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        Api::<Namespace>::all(b.client())
            .get_opt("only-in-a")
            .await
            .unwrap()
            .is_none()
    );
}
