//! Helpers shared by the runtime's integration tests: job manifests derived
//! from the examples, and one local run at a time.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test code; each test file uses a part

use std::path::{Path, PathBuf};

use geoml_crds::yaml;
use geoml_launcher::run::RunOptions;
use serde_json::Value;

/// Multi-process runs share two cores; one at a time keeps them comparable.
pub static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents of `manifests/examples/<name>`.
pub fn example(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join("manifests/examples").join(name)).unwrap();
    yaml::documents(&text).unwrap()
}

/// The document of kind `kind`.
pub fn doc<'a>(docs: &'a mut [Value], kind: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap()
}

/// Sets `path` (dot-separated) in `value` to `new`, creating maps on the way.
pub fn set(value: &mut Value, path: &str, new: Value) {
    let mut at = value;
    for key in path.split('.') {
        if at.get(key).is_none() {
            at[key] = Value::Object(serde_json::Map::new());
        }
        at = &mut at[key];
    }
    *at = new;
}

/// Writes `docs` as a manifest in `dir`.
pub fn write(dir: &Path, docs: &[Value]) -> PathBuf {
    let path = dir.join("job.yaml");
    std::fs::write(&path, yaml::to_stream(docs).unwrap()).unwrap();
    path
}

/// Runs the `geoml` binary under test with `args` to its end; returns
/// whether it succeeded, its stdout and its stderr.
pub async fn geoml(args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Options for running `manifest` with the `geoml` binary under test.
pub fn options(manifest: PathBuf, work_dir: &Path) -> RunOptions {
    RunOptions {
        geoml: PathBuf::from(env!("CARGO_BIN_EXE_geoml")),
        manifest,
        work_dir: work_dir.to_owned(),
        data_dir: geoml_dataplane::data::default_cache_dir(),
        eval_every: 20,
        progress: false,
        target: None,
        wan_control: None,
        faults: Vec::new(),
        seed: geoml_crds::roles::DEFAULT_SEED,
        insecure_plaintext: false,
    }
}

/// A loopback port nobody listens on (at the moment of asking), for a
/// process to bind later. Never the same twice in one test binary, and
/// below the kernel's ephemeral range (32768 and up), so neither a test
/// running beside this one (port 0 can hand both the same port) nor an
/// outgoing connection's local port takes it in between.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % COUNT;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < COUNT,
            "no free loopback port in {FIRST}..{}",
            FIRST + COUNT
        );
        let port = u16::try_from(FIRST + (start + n) % COUNT).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
