//! The `geoml-operator run` binary, authenticated as the ServiceAccount the
//! chart ships and bound only to the chart's RBAC rules, reconciles a job in
//! a local and a "remote" datacenter (the same cluster reached through a
//! kubeconfig Secret holding the same identity) without one forbidden request,
//! and refuses a Datacenter whose kubeconfig Secret is in another namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use geoml_crds::{Datacenter, TrainingJob};
use geoml_tests::{ControlPlane, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const TIMEOUT: Duration = geoml_tests::EVENTUALLY;

fn kubectl(plane: &ControlPlane, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = plane
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A kubeconfig for `plane` that authenticates with a bearer token.
fn token_kubeconfig(plane: &ControlPlane, token: &str) -> String {
    let admin: serde_json::Value =
        geoml_crds::yaml::from_str(&std::fs::read_to_string(plane.kubeconfig()).unwrap()).unwrap();
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "hub", "cluster": admin["clusters"][0]["cluster"] }],
        "users": [{ "name": "operator", "user": { "token": token } }],
        "contexts": [{ "name": "operator", "context": { "cluster": "hub", "user": "operator" } }],
        "current-context": "operator",
    });
    geoml_crds::yaml::to_string(&config).unwrap()
}

async fn http_get(port: u16, path: &str) -> String {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    geoml_tests::prometheus::get(addr, path, &[]).await.unwrap()
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one scenario on one control plane
async fn the_operator_needs_no_rule_beyond_the_charts() {
    let plane = ControlPlane::start("rbac").await.unwrap();
    plane.install_crds().await.unwrap();
    let admin = plane.client();
    let token = plane.chart_operator_token("geoml-system").unwrap();
    kubectl(&plane, &["create", "namespace", "ml"], None);
    let kubeconfig = token_kubeconfig(&plane, &token);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig_path = dir.path().join("operator.kubeconfig");
    std::fs::write(&kubeconfig_path, &kubeconfig).unwrap();
    kubectl(
        &plane,
        &[
            "create",
            "secret",
            "generic",
            "there-kubeconfig",
            "-n",
            "geoml-system",
            &format!("--from-file=kubeconfig={}", kubeconfig_path.display()),
        ],
        None,
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(dir.path().join("operator.log")).unwrap();
    let mut operator = Command::new(env!("CARGO_BIN_EXE_geoml-operator"))
        .args([
            "run",
            &format!("--listen=127.0.0.1:{port}"),
            "--namespace=geoml-system",
            "--identity=test-operator",
        ])
        .args([
            "--probe-seconds=1",
            "--max-backoff-seconds=2",
            "--image=geoml:test",
        ])
        .env("KUBECONFIG", &kubeconfig_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    kubectl(
        &plane,
        &["apply", "-n", "ml", "-f", "-"],
        Some(
            r"
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {name: here}
spec:
  region: local
  cluster: {local: {}}
  peerAccess: {serviceType: ClusterIP}
---
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {name: there}
spec:
  region: remote
  cluster: {remote: {kubeconfigSecretRef: {name: there-kubeconfig, namespace: geoml-system}, namespace: ml-there}}
  peerAccess: {serviceType: ClusterIP}
---
apiVersion: geoml.io/v1alpha1
kind: SyncPolicy
metadata: {name: cartel}
spec: {interDatacenter: {model: Collaborative}}
---
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {name: sites}
spec:
  model: {kind: OnlineLinear}
  dataset: {name: Digits}
  datacenters: [{name: here}, {name: there}]
  syncPolicyRef: {name: cartel}
",
        ),
    );
    let jobs = Api::<TrainingJob>::namespaced(admin.clone(), "ml");
    let log_path = dir.path().join("operator.log");
    let created = eventually("the job's objects", || async {
        let job = jobs.get("sites").await.unwrap();
        let c = job
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Created")?;
        (c.status == "True").then_some(c.message)
    });
    let message = tokio::select! {
        m = created => m,
        () = tokio::time::sleep(TIMEOUT + Duration::from_secs(1)) => panic!("{}", std::fs::read_to_string(&log_path).unwrap()),
    };
    assert!(message.contains("2 datacenters"), "{message}");
    let local_pods = Api::<Pod>::namespaced(admin.clone(), "ml");
    let remote_pods = Api::<Pod>::namespaced(admin.clone(), "ml-there");
    let lp = ListParams::default().labels("geoml.io/job=sites");
    // A Cartel site per datacenter, the registry next to the first.
    eventually("pods in both namespaces", || async {
        let here = local_pods.list(&lp).await.unwrap().items.len();
        let there = remote_pods.list(&lp).await.unwrap().items.len();
        (here == 2 && there == 1).then_some(())
    })
    .await;
    local_pods.get("sites-registry").await.unwrap();

    // A failed pod is deleted and recreated, counted once.
    let failed = json!({ "status": { "phase": "Failed" } });
    remote_pods
        .patch_status(
            "sites-there-site-0",
            &PatchParams::default(),
            &Patch::Merge(&failed),
        )
        .await
        .unwrap();
    eventually("one retry", || async {
        (jobs.get("sites").await.unwrap().status?.retries == 1).then_some(())
    })
    .await;

    let lease = Api::<Lease>::namespaced(admin.clone(), "geoml-system")
        .get("geoml-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("test-operator")
    );
    assert!(http_get(port, "/readyz").await.ends_with("ok"));
    assert!(
        http_get(port, "/metrics")
            .await
            .contains("geoml_operator_reconciliations_total{controller=\"trainingjob\"}")
    );

    // A Datacenter naming a kubeconfig Secret outside the operator's
    // namespace is refused without the Secret being read (a read would show
    // as a forbidden request below).
    kubectl(
        &plane,
        &[
            "create",
            "secret",
            "generic",
            "team-b-kubeconfig",
            "-n",
            "ml",
            &format!("--from-file=kubeconfig={}", kubeconfig_path.display()),
        ],
        None,
    );
    kubectl(
        &plane,
        &["apply", "-f", "-"],
        Some(
            r"
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {name: elsewhere}
spec:
  region: remote
  cluster: {remote: {kubeconfigSecretRef: {name: team-b-kubeconfig, namespace: ml}}}
  peerAccess: {serviceType: ClusterIP}
",
        ),
    );
    let datacenters = Api::<Datacenter>::all(admin.clone());
    let refused = eventually("the foreign Secret refused", || async {
        let dc = datacenters.get("elsewhere").await.unwrap();
        let active = dc
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Active")?;
        (active.status == "False").then_some(active)
    })
    .await;
    assert_eq!(refused.reason, "KubeconfigSecretOutsideOperatorNamespace");
    assert!(
        refused.message.contains("kubeconfigSecretRef.namespace")
            && refused.message.contains("geoml-system"),
        "{}",
        refused.message
    );

    jobs.delete("sites", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the job and its objects gone", || async {
        let gone = jobs.get_opt("sites").await.unwrap().is_none()
            && local_pods.list(&lp).await.unwrap().items.is_empty()
            && remote_pods.list(&lp).await.unwrap().items.is_empty();
        gone.then_some(())
    })
    .await;

    // SIGTERM: a graceful stop that hands the Lease back.
    let status = Command::new("kill")
        .args(["-TERM", &operator.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = operator.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(exit.success(), "{exit}: {log}");
    let lease = Api::<Lease>::namespaced(admin.clone(), "geoml-system")
        .get("geoml-operator")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None);

    let audited = std::fs::read_to_string(plane.audit_log())
        .unwrap()
        .lines()
        .count();
    assert!(audited > 20, "only {audited} audited requests");
    let forbidden = plane.forbidden_requests();
    assert!(
        forbidden.is_empty(),
        "forbidden requests:\n{}\noperator log:\n{log}",
        forbidden.join("\n")
    );
}
