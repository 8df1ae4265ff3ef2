//! The Helm chart as users meet it: `helm lint --strict`, the rendered
//! manifests checked by `kubeconform -strict` against the schemas of the
//! Kubernetes release the tests build (and geoml's CRDs), wrong values
//! refused with the field named, and `helm install` on a real one-node
//! cluster running a job to `Succeeded`, then `helm uninstall` leaving no
//! operator object behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use geoml_crds::TrainingJob;
use geoml_crds::training_job::{DatasetName, JobPhase};
use geoml_tests::helm::{self, RELEASE, chart_dir};
use geoml_tests::{
    Cluster, Helm, data_cache, eventually, eventually_within, example, geoml_images, schemas,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

const NAMESPACE: &str = "geoml-system";
/// Longest a job may take from apply to a finished phase.
const TRAINING: Duration = Duration::from_secs(15 * 60);

fn output(cmd: &mut std::process::Command) -> Output {
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sets(values: &[&str]) -> Vec<String> {
    values.iter().map(|&v| v.to_owned()).collect()
}

/// The value sets the chart is checked with: defaults, every optional
/// object on, and everything off that can be.
fn value_sets() -> Vec<Vec<String>> {
    vec![
        Vec::new(),
        sets(&[
            "serviceMonitor.enabled=true",
            "serviceMonitor.labels.release=prometheus",
            "podMonitor.enabled=true",
            "dashboards.enabled=true",
            "replicas=2",
            "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "imagePullSecrets[0].name=registry",
            "nodeSelector.kubernetes\\.io/os=linux",
        ]),
        sets(&[
            "dashboards.enabled=false",
            "rbac.create=false",
            "serviceAccount.create=false",
            "serviceAccount.name=existing",
        ]),
    ]
}

#[test]
fn chart_passes_helm_lint_strict() {
    let helm = Helm::new().unwrap();
    for values in value_sets() {
        let mut cmd = helm.command();
        cmd.args(["lint", "--strict"]).arg(chart_dir());
        for value in &values {
            cmd.args(["--set", value]);
        }
        let out = output(&mut cmd);
        assert!(
            out.status.success(),
            "helm lint --strict {values:?}:\n{}",
            text(&out)
        );
        assert!(text(&out).contains("0 chart(s) failed"), "{}", text(&out));
    }
}

/// Runs `kubeconform -strict` on `manifests` with the local schemas in
/// `dir`; the output, or a panic naming what failed.
fn kubeconform(dir: &Path, what: &str, manifests: &str) -> String {
    let mut cmd = std::process::Command::new(helm::kubeconform_bin().unwrap());
    cmd.args(["-strict", "-summary", "-output", "text"])
        .args(["-kubernetes-version", "1.36.3"])
        .arg("-schema-location")
        .arg(schemas::location(dir))
        .arg("-");
    let result = geoml_tests::run(&mut cmd, Some(manifests));
    match result {
        Ok(out) => out,
        Err(e) => panic!("kubeconform -strict rejects {what}: {e}\n{manifests}"),
    }
}

fn local_schemas() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // geoml's CRDs, and the Prometheus Operator's for the optional monitors.
    let mut crds = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds.yaml"),
    )
    .unwrap();
    crds.push_str(&schemas::monitoring_crds().unwrap());
    let written =
        schemas::write(&schemas::kubernetes_openapi().unwrap(), &crds, dir.path()).unwrap();
    assert!(written > 100, "only {written} schemas");
    dir
}

#[test]
fn rendered_chart_passes_kubeconform_strict_with_local_schemas() {
    let schemas = local_schemas();
    let helm = Helm::new().unwrap();
    for mut values in value_sets() {
        let manifests = helm.template(NAMESPACE, &values).unwrap();
        let summary = kubeconform(schemas.path(), &format!("{values:?}"), &manifests);
        assert!(summary.contains("Invalid: 0, Errors: 0"), "{summary}");
        assert!(!summary.contains("Skipped: 1"), "{summary}");
        // And the CRDs, as `--include-crds` renders them.
        values.push("dashboards.enabled=false".into());
        let mut cmd = helm.command();
        cmd.args([
            "template",
            RELEASE,
            "--include-crds",
            "--namespace",
            NAMESPACE,
        ])
        .arg(chart_dir());
        let with_crds = geoml_tests::run(&mut cmd, None).unwrap();
        assert!(with_crds.contains("kind: CustomResourceDefinition"));
        kubeconform(schemas.path(), "the chart's CRDs", &with_crds);
    }
}

#[test]
fn kubeconform_rejects_what_the_apiserver_would() {
    // The schemas are strict: a misspelt field, a wrong type and a wrong
    // kind for the group are all refused (so the checks above can fail).
    let schemas = local_schemas();
    let bad = [
        (
            "a misspelt field",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}], selectr: {}}\n",
        ),
        (
            "a wrong type",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\nspec: {replicas: two, selector: {}, template: {}}\n",
        ),
        (
            "a CRD field that does not exist",
            "apiVersion: geoml.io/v1alpha1\nkind: SyncPolicy\nmetadata: {name: a}\nspec: {intraDatacenter: {model: BSP}, interDatacenter: {model: LAN}, treshold: 1}\n",
        ),
    ];
    for (what, manifest) in bad {
        let mut cmd = std::process::Command::new(helm::kubeconform_bin().unwrap());
        cmd.args(["-strict", "-kubernetes-version", "1.36.3"])
            .arg("-schema-location")
            .arg(schemas::location(schemas.path()))
            .arg("-");
        assert!(
            geoml_tests::run(&mut cmd, Some(manifest)).is_err(),
            "kubeconform accepted {what}"
        );
    }
}

#[test]
fn examples_pass_kubeconform_strict_against_the_crds() {
    let schemas = local_schemas();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for path in names {
        let manifest = std::fs::read_to_string(&path).unwrap();
        let summary = kubeconform(schemas.path(), &path.display().to_string(), &manifest);
        assert!(summary.contains("Invalid: 0, Errors: 0"), "{summary}");
    }
}

/// Wrong values, and the field helm must name when it refuses each.
const WRONG_VALUES: [(&str, &str); 5] = [
    ("replicas=two", "replicas"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("operator.probeSecond=10", "probeSecond"),
    ("securityContext.privileged=true", "privileged"),
    ("metrics.port=70000", "port"),
];

#[test]
fn helm_refuses_wrong_values_naming_the_field() {
    let helm = Helm::new().unwrap();
    for (value, field) in WRONG_VALUES {
        let mut cmd = helm.command();
        cmd.args(["template", RELEASE])
            .arg(chart_dir())
            .args(["--set", value]);
        let out = output(&mut cmd);
        assert!(!out.status.success(), "helm accepted {value}");
        let message = text(&out);
        assert!(
            message.contains("values don't meet the specifications of the schema")
                && message.contains(field),
            "refusing {value}, helm does not name {field}:\n{message}"
        );
    }
}

async fn release_objects(client: &kube::Client) -> Vec<String> {
    let selector = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    let mut found = Vec::new();
    macro_rules! collect {
        ($kind:ty, $api:expr) => {
            let api: Api<$kind> = $api;
            for o in api.list(&selector).await.unwrap().items {
                found.push(format!("{} {}", stringify!($kind), o.name_any()));
            }
        };
    }
    collect!(Deployment, Api::namespaced(client.clone(), NAMESPACE));
    collect!(Pod, Api::namespaced(client.clone(), NAMESPACE));
    collect!(ServiceAccount, Api::namespaced(client.clone(), NAMESPACE));
    collect!(Service, Api::namespaced(client.clone(), NAMESPACE));
    collect!(Role, Api::namespaced(client.clone(), NAMESPACE));
    collect!(RoleBinding, Api::namespaced(client.clone(), NAMESPACE));
    collect!(ClusterRole, Api::all(client.clone()));
    collect!(ClusterRoleBinding, Api::all(client.clone()));
    collect!(ConfigMap, Api::namespaced(client.clone(), NAMESPACE));
    found
}

/// The chart's operator runs in a Ready pod on the cluster's real node, as
/// the chart's ServiceAccount, from the harness's image, locked down.
async fn operator_runs_on_the_node(cluster: &Cluster) {
    let client = cluster.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let selector = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    let operator = eventually("the operator pod Ready", || async {
        let list = pods.list(&selector).await.ok()?;
        list.items.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    })
    .await;
    let spec = operator.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(cluster.node().name()));
    assert_eq!(spec.service_account_name.as_deref(), Some("geoml-operator"));
    let container = &spec.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(geoml_tests::image::reference("geoml-operator").as_str())
    );
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());
}

/// The operator's requests that the apiserver refused (403), from its audit
/// log: with the chart's RBAC there must be none.
fn forbidden_requests(cluster: &Cluster) -> Vec<String> {
    let user = format!("system:serviceaccount:{NAMESPACE}:geoml-operator");
    let log = std::fs::read_to_string(cluster.control_plane().audit_log()).unwrap();
    let mut seen = 0;
    let mut forbidden = Vec::new();
    for line in log.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["user"]["username"] != user.as_str() {
            continue;
        }
        seen += 1;
        if event["responseStatus"]["code"] == 403 {
            forbidden.push(format!("{} {}", event["verb"], event["requestURI"]));
        }
    }
    assert!(seen > 0, "no request of {user} in the audit log");
    forbidden
}

/// `helm uninstall` removes every object of the release (checked present
/// first) and leaves the CRDs, as Helm does; returns what was left.
async fn uninstall_leaves_nothing(helm: &Helm, client: &kube::Client) -> Vec<String> {
    let before = release_objects(client).await;
    for kind in [
        "Deployment",
        "ServiceAccount",
        "Service",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    ] {
        assert!(
            before.iter().any(|o| o.starts_with(&format!("{kind} "))),
            "no {kind} installed: {before:?}"
        );
    }
    let mut uninstall = helm.command();
    uninstall
        .args(["uninstall", RELEASE, "--namespace", NAMESPACE])
        .args(["--wait", "--timeout", "2m"]);
    let out = output(&mut uninstall);
    assert!(out.status.success(), "{}", text(&out));
    let left = eventually("the operator's objects to go", || async {
        let left = release_objects(client).await;
        left.is_empty().then_some(left)
    })
    .await;
    assert!(left.is_empty());
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "trainingjobs.geoml.io",
        "datacenters.geoml.io",
        "syncpolicies.geoml.io",
    ] {
        assert!(crds.get_opt(name).await.unwrap().is_some(), "{name} went");
    }
    left
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_runs_a_job_to_succeeded_and_uninstall_leaves_nothing() {
    let data = data_cache(DatasetName::FashionMnist).unwrap();
    let images = geoml_images().unwrap();
    let cluster = Cluster::start("helm", &images).await.unwrap();
    let client = cluster.client();
    let helm = Helm::new().unwrap().with_kubeconfig(cluster.kubeconfig());
    let install = |extra: &[String]| {
        let mut cmd = helm.command();
        cmd.args(["install", RELEASE])
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE, "--create-namespace"])
            .args(["--wait", "--timeout", "3m"]);
        for value in helm::harness_image_values().iter().chain(extra) {
            cmd.args(["--set", value]);
        }
        output(&mut cmd)
    };

    // A wrong value: refused, the field named, nothing installed.
    let refused = install(&sets(&["operator.progressSeconds=soon"]));
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("progressSeconds"),
        "{}",
        text(&refused)
    );
    assert!(release_objects(&client).await.is_empty());

    let installed = install(&sets(&[
        "operator.progressSeconds=5",
        "operator.probeSeconds=10",
    ]));
    assert!(installed.status.success(), "{}", text(&installed));
    let notes = text(&installed);
    assert!(notes.contains("kubectl get tj"), "NOTES.txt: {notes}");

    operator_runs_on_the_node(&cluster).await;

    // That operator trains the example to Succeeded.
    cluster.provide_data("default", &data).await.unwrap();
    geoml_tests::run(
        cluster.kubectl().args(["apply", "-f", "-"]),
        Some(&example("fashion-mnist-lan.yaml").unwrap()),
    )
    .unwrap();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), "default");
    let done = eventually_within(TRAINING, "fashion-mnist-lan to succeed", || async {
        let job = jobs.get("fashion-mnist-lan").await.ok()?;
        let status = job.status.clone().unwrap_or_default();
        assert_ne!(status.phase, Some(JobPhase::Failed), "{status:#?}");
        (status.phase == Some(JobPhase::Succeeded)).then_some(status)
    })
    .await;
    let metric = done.metric.unwrap();
    assert!(metric >= 0.83, "accuracy {metric} below the target 0.83");

    assert_eq!(forbidden_requests(&cluster), Vec::<String>::new());

    let left = uninstall_leaves_nothing(&helm, &client).await;
    assert!(jobs.get_opt("fashion-mnist-lan").await.unwrap().is_some());
    eprintln!(
        "helm: fashion-mnist-lan Succeeded with accuracy {metric:.4} under the helm-installed operator; uninstall left {left:?}"
    );
}
