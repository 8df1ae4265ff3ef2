//! `geoml run` refuses what the apiserver refuses, before starting any
//! role, naming the same field: each fixture of `tests/fixtures/invalid/`
//! (which tests/tests/crds.rs feeds to a real apiserver) replaces the object
//! of its kind in an example, and the mistakes a new user makes are refused
//! in one clear line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::path::Path;
use std::process::Command;

use common::{doc, example, repo_root, set, write};
use geoml_crds::yaml;
use serde_json::{Value, json};

/// Runs `geoml run` on `docs`; its exit success, its stderr, and whether it
/// started any role (a started role has a log directory).
fn geoml_run(docs: &[Value]) -> (bool, String, bool) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write(dir.path(), docs);
    let work = dir.path().join("work");
    let out = Command::new(env!("CARGO_BIN_EXE_geoml"))
        .arg("run")
        .arg(&manifest)
        .arg("--work-dir")
        .arg(&work)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stderr, work.join("logs").exists())
}

/// The example with `fixture` in place of the first object of its kind,
/// renamed to that object's name so the job's references still resolve.
fn with_fixture(fixture: &Path) -> (Vec<Value>, String) {
    let text = std::fs::read_to_string(fixture).unwrap();
    let expected = text
        .lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{} has no '# expect: FIELD' line", fixture.display()))
        .to_owned();
    let mut replacement = yaml::documents(&text).unwrap().remove(0);
    let mut docs = example("gaia-3dc.yaml");
    let kind = replacement["kind"].as_str().unwrap().to_owned();
    let replaced = doc(&mut docs, &kind);
    replacement["metadata"]["name"] = replaced["metadata"]["name"].clone();
    *replaced = replacement;
    (docs, expected)
}

#[test]
fn every_invalid_fixture_is_refused_naming_the_field_the_apiserver_names() {
    let mut fixtures: Vec<_> = std::fs::read_dir(repo_root().join("tests/fixtures/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 20, "only {} fixtures", fixtures.len());
    let mut wrong = Vec::new();
    for fixture in &fixtures {
        let (docs, expected) = with_fixture(fixture);
        let (succeeded, stderr, started) = geoml_run(&docs);
        let name = fixture.file_name().unwrap().to_string_lossy();
        if succeeded || started {
            wrong.push(format!(
                "{name}: succeeded {succeeded}, started roles {started}"
            ));
        } else if !stderr.starts_with("error: ") || stderr.lines().count() != 1 {
            wrong.push(format!("{name}: not one `error:` line:\n{stderr}"));
        } else if stderr.matches(&expected).count() != 1 {
            wrong.push(format!("{name}: does not name {expected} once: {stderr}"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn a_new_users_mistakes_are_refused_in_one_clear_line() {
    let cases: [(&str, &str, Value, &str); 5] = [
        (
            "SyncPolicy",
            "spec.significance.threshold",
            json!(5),
            "spec.significance.threshold: must be in (0, 1], got 5.0",
        ),
        (
            "SyncPolicy",
            "spec.significance.treshold",
            json!(0.1),
            "spec.significance.treshold: unknown field",
        ),
        (
            "TrainingJob",
            "spec.model.batchSize",
            json!(0),
            "spec.model.batchSize: should be greater than or equal to 1, got 0",
        ),
        (
            "TrainingJob",
            "spec.model.kind",
            json!("Transformer"),
            "spec.model.kind: unsupported value \"Transformer\"",
        ),
        (
            "Datacenter",
            "spec.wan.bandwidthMbps",
            json!("fast"),
            "spec.wan.bandwidthMbps: must be of type number, got string \"fast\"",
        ),
    ];
    for (kind, field, value, message) in cases {
        let mut docs = example("gaia-3dc.yaml");
        set(doc(&mut docs, kind), field, value);
        let (succeeded, stderr, started) = geoml_run(&docs);
        assert!(!succeeded && !started, "{field}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert_eq!(stderr.matches(message).count(), 1, "{field}: {stderr}");
    }

    let mut docs = example("gaia-3dc.yaml");
    let datacenters = doc(&mut docs, "TrainingJob")["spec"]["datacenters"]
        .as_array_mut()
        .unwrap();
    datacenters[1]["workers"] = json!(0);
    datacenters[2]["parameterServers"] = json!(0);
    let (succeeded, stderr, started) = geoml_run(&docs);
    assert!(!succeeded && !started, "{stderr}");
    for field in [
        "spec.datacenters[1].workers: should be greater than or equal to 1, got 0",
        "spec.datacenters[2].parameterServers: should be greater than or equal to 1, got 0",
    ] {
        assert!(stderr.contains(field), "{field} not in {stderr}");
    }
}
