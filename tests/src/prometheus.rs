//! Reading Prometheus's HTTP API and metrics endpoints from tests and tools,
//! with hyper's client (the one kube uses) and `form_urlencoded` queries.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::Error;

/// GET `path` (with `query`'s pairs encoded) from `addr`; the body of a 200
/// answer.
pub async fn get(addr: SocketAddr, path: &str, query: &[(&str, &str)]) -> Result<String, Error> {
    let mut uri = format!("http://{addr}{path}");
    if !query.is_empty() {
        uri.push('?');
        uri.push_str(
            &form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish(),
        );
    }
    let http = |e: &dyn std::fmt::Display| Error::Http(format!("GET {uri}: {e}"));
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client
        .get(uri.parse().map_err(|e| http(&e))?)
        .await
        .map_err(|e| http(&e))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| http(&e))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(http(&format!("{status}: {body}")));
    }
    Ok(body)
}

/// Waits up to `timeout` for Prometheus at `addr` to say it is ready.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if get(addr, "/-/ready", &[]).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The samples of instant query `promql` (at Unix time `at`, or now); a
/// scalar result is one sample.
pub async fn query(addr: SocketAddr, promql: &str, at: Option<f64>) -> Result<Vec<Value>, Error> {
    let at = at.map(|t| t.to_string());
    let mut params = vec![("query", promql)];
    params.extend(at.as_deref().map(|t| ("time", t)));
    let data = api(addr, "/api/v1/query", &params).await?;
    if data["resultType"] == "scalar" {
        return Ok(vec![json!({"value": data["result"]})]);
    }
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

/// The `data` of a successful API answer.
pub async fn api(addr: SocketAddr, path: &str, query: &[(&str, &str)]) -> Result<Value, Error> {
    let body = get(addr, path, query).await?;
    let answer: Value =
        serde_json::from_str(&body).map_err(|e| Error::Http(format!("{path}: {e} in {body}")))?;
    if answer["status"] != "success" {
        return Err(Error::Http(format!("{path}: {answer}")));
    }
    Ok(answer["data"].clone())
}

/// The value of an instant-query sample.
#[must_use]
pub fn value(sample: &Value) -> Option<f64> {
    sample["value"][1].as_str()?.parse().ok()
}

/// Starts Prometheus `binary` (under `wrapper`'s command, e.g. `nsenter
/// --net=...`, when not empty) with `config` (its YAML), its files in `dir`,
/// listening on `address`; the process once it is ready. It is killed when
/// the handle drops.
pub async fn start(
    wrapper: &[String],
    binary: &str,
    dir: &Path,
    config: &str,
    address: SocketAddr,
) -> Result<tokio::process::Child, Error> {
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, config).map_err(Error::io("writing prometheus.yml"))?;
    let log_file = dir.join("prometheus.log");
    let log = std::fs::File::create(&log_file).map_err(Error::io("creating prometheus.log"))?;
    let (program, args) = wrapper
        .split_first()
        .map_or((binary, &[][..]), |(p, rest)| (p.as_str(), rest));
    let mut command = tokio::process::Command::new(program);
    if !wrapper.is_empty() {
        command.args(args).arg(binary);
    }
    let server = command
        .arg(format!("--config.file={}", config_file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={address}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io(format!("starting {binary}")))?;
    if wait_ready(address, Duration::from_secs(30)).await {
        return Ok(server);
    }
    Err(Error::Http(format!(
        "prometheus did not become ready on {address}:\n{}",
        std::fs::read_to_string(&log_file).unwrap_or_default()
    )))
}

/// A dashboard query `expr` with every Grafana variable `$name` and
/// `${name}` of `vars` replaced, longest names first (so that `$__range`
/// does not eat the start of a longer name).
#[must_use]
pub fn substitute<N: AsRef<str>>(expr: &str, vars: &[(N, String)]) -> String {
    let mut sorted: Vec<_> = vars.iter().collect();
    sorted.sort_by_key(|(name, _)| std::cmp::Reverse(name.as_ref().len()));
    let mut out = expr.to_owned();
    for (name, value) in sorted {
        let name = name.as_ref();
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    out
}
