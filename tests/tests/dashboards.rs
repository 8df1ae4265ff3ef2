//! The chart's Grafana dashboards: every panel's PromQL parses and names only
//! metrics geoml exports (the names come from the code that registers them,
//! so a rename fails here), and a real Prometheus (built from its Go module:
//! Debian's lacks Kubernetes discovery) that
//! discovers a Gaia job's pods through a harness cluster's apiserver
//! (`kubernetes_sd_configs`) answers every panel's query with data; then
//! `render-dashboard` draws the sync-traffic panels from it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss
)] // test code; timestamps and counts are far below 2^52

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use geoml_crds::training_job::JobPhase;
use geoml_crds::{TrainingJob, yaml};
use geoml_tests::prometheus as prom;
use geoml_tests::{Cluster, eventually_within, geoml_images};
use promql_parser::parser::{self, Expr};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every dashboard of the chart: (file name, JSON).
fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("charts/geoml/dashboards");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        out.len(),
        3,
        "sync traffic, training and operator dashboards"
    );
    out
}

/// One query of a panel.
#[derive(Debug)]
struct Query {
    dashboard: String,
    panel: String,
    expr: String,
}

/// Every panel query of `dashboard` (rows' nested panels too).
fn queries(name: &str, dashboard: &Value) -> Vec<Query> {
    fn walk(name: &str, panels: &Value, out: &mut Vec<Query>) {
        for panel in panels.as_array().into_iter().flatten() {
            walk(name, &panel["panels"], out);
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(Query {
                    dashboard: name.to_owned(),
                    panel: panel["title"].as_str().unwrap().to_owned(),
                    expr: target["expr"].as_str().unwrap().to_owned(),
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(name, &dashboard["panels"], &mut out);
    out
}

/// `expr` with Grafana's variables replaced, none left over.
fn substitute(expr: &str, vars: &[(&str, String)]) -> String {
    let out = prom::substitute(expr, vars);
    assert!(!out.contains('$'), "a variable left in {out}");
    out
}

/// Values of the template variables for the static checks.
fn static_vars() -> Vec<(&'static str, String)> {
    vec![
        ("namespace", ".*".into()),
        ("job", ".*".into()),
        ("datacenter", ".*".into()),
        ("target", "0.83".into()),
        ("reached", ">=".into()),
        ("egress_cost_per_gib", "0.09".into()),
        ("__rate_interval", "1m".into()),
        ("__range", "1h".into()),
        ("__interval", "15s".into()),
    ]
}

/// The metric names `expr` selects.
fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    match expr {
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::VectorSelector(v) => selector_name(v, out),
        Expr::MatrixSelector(m) => selector_name(&m.vs, out),
        Expr::Call(c) => c.args.args.iter().for_each(|a| metric_names(a, out)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn selector_name(v: &promql_parser::parser::VectorSelector, out: &mut BTreeSet<String>) {
    let by_matcher = v
        .matchers
        .matchers
        .iter()
        .find(|m| m.name == "__name__")
        .map(|m| m.value.clone());
    let name = v.name.clone().or(by_matcher);
    out.insert(name.unwrap_or_else(|| panic!("a selector without a metric name: {v}")));
}

/// Every series name geoml's pods and operator serve, from the code that
/// registers them (histograms as their `_bucket`, `_sum` and `_count`
/// series), plus `up`, which Prometheus writes for every target.
fn exported_metrics() -> BTreeSet<String> {
    let registry = prometheus::Registry::new();
    let ps = geoml_dataplane::metrics::PsMetrics::new(&registry, "a", 0).unwrap();
    // Vectors show a series only once it has a label value: give every one.
    ps.observe_mirror(&geoml_dataplane::pb::MirrorStatus {
        peers: vec![geoml_dataplane::pb::PeerStatus {
            datacenter: "b".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    ps.rejected.with_label_values(&["any"]).inc();
    geoml_dataplane::metrics::WorkerMetrics::new(&registry, 0).unwrap();
    let mut names: BTreeSet<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    let operator = geoml_operator::Metrics::new().unwrap();
    drop(operator.reconcile("job"));
    operator.failure("job", "kube");
    for line in operator.render().unwrap().lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_owned());
            }
        }
    }
    names.insert("up".to_owned());
    // The names the operator and runtime share are among them.
    for name in geoml_crds::metrics::PROGRESS
        .iter()
        .chain(&[geoml_crds::metrics::MIRROR_THRESHOLD])
    {
        assert!(names.contains(*name), "{name} not registered");
    }
    names
}

#[test]
fn panel_queries_parse_and_name_only_exported_metrics() {
    let exported = exported_metrics();
    let mut used = BTreeSet::new();
    let mut count = 0;
    for (name, dashboard) in dashboards() {
        assert_eq!(dashboard["schemaVersion"], 39, "{name}");
        let variables: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(
            variables.starts_with(&["datasource", "namespace"]),
            "{name}: {variables:?}"
        );
        if name != "operator.json" {
            assert!(
                variables.contains(&"job") && variables.contains(&"datacenter"),
                "{name}"
            );
        }
        // Query variables: the selector inside label_values(…, label).
        for v in dashboard["templating"]["list"].as_array().unwrap() {
            if v["type"] == "query" {
                let q = v["definition"].as_str().unwrap();
                let inner = q
                    .strip_prefix("label_values(")
                    .and_then(|r| r.rsplit_once(','))
                    .map_or_else(|| panic!("{name}: {q}"), |(sel, _)| sel);
                let expr = parser::parse(&substitute(inner, &static_vars()))
                    .unwrap_or_else(|e| panic!("{name}: variable {q}: {e}"));
                metric_names(&expr, &mut used);
            }
        }
        for q in queries(&name, &dashboard) {
            let expr = substitute(&q.expr, &static_vars());
            let parsed = parser::parse(&expr)
                .unwrap_or_else(|e| panic!("{} / {}: {expr}: {e}", q.dashboard, q.panel));
            let mut names = BTreeSet::new();
            metric_names(&parsed, &mut names);
            for metric in &names {
                assert!(
                    exported.contains(metric),
                    "{} / {}: {metric} is not exported by geoml (exported: {exported:?})",
                    q.dashboard,
                    q.panel
                );
            }
            used.extend(names);
            count += 1;
        }
    }
    assert!(count >= 30, "only {count} queries");
    // The sync-traffic names the runtime and operator share are all shown.
    for name in geoml_crds::metrics::PROGRESS {
        assert!(used.contains(name), "no panel shows {name}");
    }
}

// ---------------------------------------------------------------------------
// A real Prometheus over a real Gaia run.

/// Builds a Prometheus server with Kubernetes service discovery once, into
/// the cache, and returns its path. Debian's package (what
/// `tests/tools/prometheus.sh` fetches for the runtime's test) is built
/// without it: its 2.42 refuses `kubernetes_sd_configs` ("field not found in
/// type config.ScrapeConfig"). This one comes from the Go module proxy at the
/// version `tests/prometheus/go.mod` pins, with only that discovery (build
/// tags `remove_all_sd`, `enable_kubernetes_sd`).
fn prometheus_binary() -> String {
    const BUILD: &str = r#"
set -euo pipefail
cache=${GEOML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/geoml}/prometheus-k8s
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
key=$(cat go.mod go.sum | sha256sum | cut -c1-16)
bin=$cache/$key/prometheus
if [ ! -x "$bin" ]; then
  mkdir -p "$cache/$key"
  go build -trimpath -tags remove_all_sd,enable_kubernetes_sd -o "$bin.tmp" \
    github.com/prometheus/prometheus/cmd/prometheus >&2
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
"#;
    let output = Command::new("bash")
        .args(["-c", BUILD])
        .current_dir(repo().join("tests/prometheus"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "building Prometheus failed");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The result of instant query `promql` at Unix time `at`.
async fn query(addr: SocketAddr, promql: &str, at: f64) -> Vec<Value> {
    prom::query(addr, promql, Some(at))
        .await
        .unwrap_or_else(|e| panic!("query {promql}: {e}"))
}

fn value(sample: &Value) -> f64 {
    prom::value(sample).unwrap()
}

/// The network namespace of `cluster`'s node: the harness names it
/// `geoml<slot>-node<n>` for the node address `10.<200+slot>.<n>.2`.
fn node_netns(cluster: &Cluster) -> String {
    let [_, second, n, _] = cluster.address().octets();
    let name = format!("geoml{}-node{n}", second - 200);
    assert!(
        Path::new("/run/netns").join(&name).exists(),
        "no network namespace {name} for node address {}",
        cluster.address()
    );
    name
}

/// Prometheus's configuration: job pods and the operator's pod, found by
/// Kubernetes service discovery through the cluster's apiserver, with the
/// target labels the chart's PodMonitor and ServiceMonitor give.
fn prometheus_config(kubeconfig: &Path) -> String {
    let sd = format!(
        "kubernetes_sd_configs: [{{role: pod, kubeconfig_file: '{}'}}]",
        kubeconfig.display()
    );
    let label = |meta: &str, target: &str| {
        format!("  - {{source_labels: [__meta_kubernetes_{meta}], target_label: {target}}}\n")
    };
    let keep = |meta: &str, regex: &str| {
        format!(
            "  - {{source_labels: [__meta_kubernetes_{meta}], regex: '{regex}', action: keep}}\n"
        )
    };
    let mut config =
        String::from("global: {scrape_interval: 2s, scrape_timeout: 1500ms}\nscrape_configs:\n");
    let _ = write!(
        config,
        "- job_name: geoml-jobs\n  {sd}\n  relabel_configs:\n"
    );
    config += &keep("pod_label_app_kubernetes_io_managed_by", "geoml-operator");
    config += &keep("pod_container_port_name", "metrics");
    config += &label("namespace", "namespace");
    config += &label("pod_name", "pod");
    config += &label("pod_label_geoml_io_job", "geoml_io_job");
    config += &label("pod_label_geoml_io_datacenter", "geoml_io_datacenter");
    config += &label("pod_label_geoml_io_role", "geoml_io_role");
    config += &label("pod_phase", "phase");
    let _ = write!(
        config,
        "- job_name: geoml-operator\n  {sd}\n  relabel_configs:\n"
    );
    config += &keep("namespace", geoml_tests::cluster::OPERATOR_NAMESPACE);
    config += &keep("pod_label_app_kubernetes_io_name", "geoml(-operator)?");
    config += &keep("pod_container_port_name", "http");
    config += &label("namespace", "namespace");
    config += &label("pod_name", "pod");
    config
}

/// Prometheus inside `cluster`'s node network namespace (where pod IPs are
/// reachable), listening on the node's address (reachable from the host
/// through the test network's router).
async fn start_prometheus(cluster: &Cluster, dir: &Path) -> (tokio::process::Child, SocketAddr) {
    let binary = prometheus_binary();
    let address = SocketAddr::from((cluster.address(), 9095));
    let nsenter = [
        "nsenter".to_owned(),
        format!("--net=/run/netns/{}", node_netns(cluster)),
    ];
    let config = prometheus_config(cluster.kubeconfig());
    let server = prom::start(&nsenter, &binary, dir, &config, address)
        .await
        .unwrap();
    (server, address)
}

/// The Gaia example over three datacenters of one cluster, small enough for
/// a shared machine: the digits data set (in the image, no volume), a
/// mirror clock every 5 clocks, 4000 clocks (about a minute on loopback).
fn gaia_in_one_cluster() -> String {
    let manifest =
        std::fs::read_to_string(repo().join("manifests/examples/gaia-3dc.yaml")).unwrap();
    let mut docs = yaml::documents(&manifest).unwrap();
    for value in &mut docs {
        match value["kind"].as_str() {
            Some("Datacenter") => {
                value["spec"]["peerAccess"] = json!({"serviceType": "ClusterIP"});
            }
            Some("SyncPolicy") => value["spec"]["mirrorClockPeriod"] = 5.into(),
            Some("TrainingJob") => {
                value["spec"]["dataset"]["name"] = "Digits".into();
                value["spec"]["model"]["learningRate"] = 0.1.into();
                value["spec"]["stopping"] = json!({"maxClocks": 4000});
            }
            _ => {}
        }
    }
    yaml::to_stream(&docs).unwrap()
}

/// A job the apiserver refuses pods for: its CPU request is no quantity
/// (the CRD takes any string there, Pods do not), so the operator's
/// reconciliations of it fail, which the operator
/// dashboard's error panel must show.
const REFUSED: &str = "
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {name: refused}
spec:
  model: {kind: SoftmaxRegression}
  dataset: {name: Digits}
  datacenters:
  - name: us-east
    parameterServers: 1
    workers: 1
    resources:
      parameterServer: {requests: {cpu: lots}}
      worker: {requests: {cpu: lots}}
  syncPolicyRef: {name: gaia}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_answers_every_panel_of_a_gaia_run_on_a_real_node() {
    let images = geoml_images().unwrap();
    let cluster = Cluster::start("dashboards", &images).await.unwrap();
    cluster.install_operator().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_prometheus, prometheus) = start_prometheus(&cluster, dir.path()).await;
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        geoml_tests::run(cluster.kubectl().args(args), stdin).unwrap()
    };

    kubectl(&["apply", "-f", "-"], Some(&gaia_in_one_cluster()));
    let started = now();
    kubectl(&["apply", "-f", "-"], Some(REFUSED));
    let jobs = Api::<TrainingJob>::namespaced(cluster.client(), "default");

    // While the job runs, remember the last moment Prometheus saw all three
    // parameter servers up: a finished pod's series go stale, so the panels
    // are read at that moment.
    let seen_all = std::cell::Cell::new(None);
    let job = eventually_within(
        Duration::from_secs(15 * 60),
        "the Gaia job to succeed",
        || {
            let jobs = jobs.clone();
            let seen = &seen_all;
            async move {
                let up = query(
                    prometheus,
                    "count(up{geoml_io_role=\"ps\"} == 1) == 3",
                    now(),
                )
                .await;
                if let Some(sample) = up.first() {
                    seen.set(sample["value"][0].as_f64());
                }
                let job = jobs.get("fashion-mnist-gaia").await.ok()?;
                let phase = job.status.as_ref().and_then(|s| s.phase);
                assert_ne!(phase, Some(JobPhase::Failed), "{:#?}", job.status);
                (phase == Some(JobPhase::Succeeded)).then_some(job)
            }
        },
    )
    .await;
    let at = seen_all
        .get()
        .expect("Prometheus never saw the three parameter servers up");
    let refused = query(
        prometheus,
        "geoml_operator_reconcile_failures_total > 0",
        at,
    )
    .await;
    let operator = query(prometheus, "up{job=\"geoml-operator\"}", at).await;
    assert!(
        !refused.is_empty(),
        "no failed reconciliation of the refused job counted; operator targets: {operator:?}"
    );
    // The lowest final metric over the datacenters: every one reached it.
    let target = query(
        prometheus,
        "min(max by (datacenter) (max_over_time(geoml_ps_metric{geoml_io_job=\"fashion-mnist-gaia\"}[1h])))",
        at,
    )
    .await;
    let target = value(&target[0]);
    let range = format!("{}s", (at - started).ceil() + 60.0);
    let vars = |namespace: &str| {
        vec![
            ("namespace", namespace.to_owned()),
            ("job", "fashion-mnist-gaia".to_owned()),
            ("datacenter", ".*".to_owned()),
            ("target", target.to_string()),
            ("reached", ">=".to_owned()),
            ("egress_cost_per_gib", "0.09".to_owned()),
            // The whole run: the operator may not have reconciled within
            // the 30 s before `at` (a clean-clone run read NaN there).
            ("__rate_interval", range.clone()),
            ("__range", range.clone()),
            ("__interval", "2s".to_owned()),
        ]
    };
    let (answered, empty) = panels_without_data(prometheus, at, &vars).await;
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    matches_the_run(prometheus, at).await;
    let svg = render_sync_traffic(prometheus, dir.path(), started - 5.0, at + 5.0);
    let status = job.status.unwrap_or_default();
    eprintln!(
        "dashboards: {answered} panel queries answered by Prometheus; run: clock {:?}, metric {:?}, \
         WAN bytes {:?}; time-to-target threshold {target:.3}; picture {}",
        status.clock,
        status.metric,
        status.wan_bytes,
        svg.display()
    );
}

/// Every panel query of every dashboard evaluated at `at` with `vars`: how
/// many returned a finite value, and the ones that did not.
async fn panels_without_data(
    prometheus: SocketAddr,
    at: f64,
    vars: &dyn Fn(&str) -> Vec<(&'static str, String)>,
) -> (usize, Vec<String>) {
    let mut empty = Vec::new();
    let mut answered = 0;
    for (name, dashboard) in dashboards() {
        let namespace = if name == "operator.json" {
            geoml_tests::cluster::OPERATOR_NAMESPACE
        } else {
            "default"
        };
        for q in queries(&name, &dashboard) {
            let expr = substitute(&q.expr, &vars(namespace));
            let result = query(prometheus, &expr, at).await;
            let finite = result.iter().any(|s| value(s).is_finite());
            if finite {
                answered += 1;
            } else {
                empty.push(format!(
                    "{} / {}: {expr} → {result:?}",
                    q.dashboard, q.panel
                ));
            }
        }
    }

    (answered, empty)
}

/// What the panels show matches the run: six directed links, the filter
/// sent some updates but not all, nine pods Running.
async fn matches_the_run(prometheus: SocketAddr, at: f64) {
    let ps = "namespace=\"default\", geoml_io_job=\"fashion-mnist-gaia\"";
    let links = query(prometheus, &format!("geoml_mirror_rtt_seconds{{{ps}}}"), at).await;
    assert_eq!(
        links.len(),
        6,
        "three datacenters, six directed links: {links:?}"
    );
    let sent = query(
        prometheus,
        &format!("sum(geoml_mirror_elements_sent_total{{{ps}}})"),
        at,
    )
    .await;
    let made = query(
        prometheus,
        &format!("sum(geoml_mirror_elements_updated_total{{{ps}}})"),
        at,
    )
    .await;
    assert!(
        value(&sent[0]) > 0.0 && value(&sent[0]) < value(&made[0]),
        "the significance filter sent {sent:?} of {made:?}"
    );
    let phases = query(prometheus, &format!("count by (phase) (up{{{ps}}})"), at).await;
    let running: f64 = phases
        .iter()
        .filter(|s| s["metric"]["phase"] == "Running")
        .map(value)
        .sum();
    assert!(
        running >= 9.0,
        "3 parameter servers and 6 workers Running: {phases:?}"
    );
}

/// Draws the sync-traffic panels from `prometheus` over `[start, end]` with
/// `render-dashboard` into `GEOML_DASHBOARD_SVG` (else into `dir`), checks
/// every time-series panel was drawn with data, and returns the file.
fn render_sync_traffic(prometheus: SocketAddr, dir: &Path, start: f64, end: f64) -> PathBuf {
    let svg = std::env::var_os("GEOML_DASHBOARD_SVG")
        .map_or_else(|| dir.join("sync-traffic.svg"), PathBuf::from);
    let status = Command::new(env!("CARGO_BIN_EXE_render-dashboard"))
        .arg(format!("--prometheus={prometheus}"))
        .arg(format!(
            "--dashboard={}",
            repo()
                .join("charts/geoml/dashboards/sync-traffic.json")
                .display()
        ))
        .arg(format!("--out={}", svg.display()))
        .args(["--var=namespace=default", "--var=job=fashion-mnist-gaia"])
        .arg(format!("--start={start}"))
        .arg(format!("--end={end}"))
        .args(["--step=1", "--rate-interval=10s"])
        .status()
        .unwrap();
    assert!(status.success());
    let picture = std::fs::read_to_string(&svg).unwrap();
    let (_, sync) = dashboards()
        .into_iter()
        .find(|(n, _)| n == "sync-traffic.json")
        .unwrap();
    for panel in sync["panels"].as_array().unwrap() {
        if panel["type"] == "timeseries" {
            let title = panel["title"].as_str().unwrap();
            assert!(
                picture.contains(title),
                "{title} not drawn in {}",
                svg.display()
            );
        }
    }
    assert!(
        !picture.contains("no data"),
        "a panel drew no data: {}",
        svg.display()
    );
    svg
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

use kube::Api;
