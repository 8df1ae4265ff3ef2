//! Nothing outlives its launcher: a `geoml run` killed by SIGKILL, which
//! can clean up nothing, leaves none of its processes running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ONE_RUN_AT_A_TIME, doc, example, set, write};
use geoml_crds::manifest::Manifest;
use serde_json::json;

/// The processes whose parent is `parent` and that have not exited (a
/// zombie has exited; only its entry waits for a reaper).
fn live_children(parent: u32) -> BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let (state, its_parent) = stat(pid)?;
            (its_parent == parent && state != "Z").then_some(pid)
        })
        .collect()
}

/// Whether `pid` still runs.
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != "Z")
}

/// State and parent of `pid`, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(String, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (in parentheses) may hold spaces: fields follow the last ')'.
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_owned();
    Some((state, fields.next()?.parse().ok()?))
}

#[tokio::test]
async fn a_sigkilled_geoml_run_leaves_no_process_behind() {
    let _one = ONE_RUN_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut docs = example("gaia-3dc.yaml");
    // Long enough to be killed mid-run.
    set(
        doc(&mut docs, "TrainingJob"),
        "spec.stopping",
        json!({"maxClocks": 1_000_000}),
    );
    let manifest = write(dir.path(), &docs);
    let plan = Manifest::load(&manifest).unwrap().job().unwrap().plan;
    // Every shard and worker, and the WAN emulator.
    let roles = plan.total_shards() + plan.total_workers() + 1;

    let mut launcher = Command::new(env!("CARGO_BIN_EXE_geoml"))
        .arg("run")
        .arg(&manifest)
        .arg(format!("--work-dir={}", dir.path().join("run").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut children = live_children(launcher.id());
    while children.len() < roles {
        assert!(
            Instant::now() < deadline,
            "geoml run started {} of {roles} roles",
            children.len()
        );
        assert!(launcher.try_wait().unwrap().is_none(), "geoml run ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
        children = live_children(launcher.id());
    }
    // Training is under way.
    tokio::time::sleep(Duration::from_secs(2)).await;

    launcher.kill().unwrap(); // SIGKILL
    launcher.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while children.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<u32> = children.into_iter().filter(|&pid| alive(pid)).collect();
    for &pid in &left {
        // Do not leave them to the next test; then fail.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert!(left.is_empty(), "still running 5 s after SIGKILL: {left:?}");
}
