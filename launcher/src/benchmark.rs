//! `geoml benchmark`: Gaia's benchmark on several model families — every
//! workload of a suite file on every topology manifest under every mode, one
//! ratio table per topology, LAN's spread over seeds, and Gaia's WAN bytes
//! per value coding.
//!
//! A topology manifest (`gaia-3dc.yaml`, `gaia-5dc.yaml`) gives the
//! Datacenters, the SyncPolicy and the job's placement; a workload of the
//! suite (`manifests/benchmark/models.yaml`) replaces the job's model, data
//! set and stopping rule and the policy's significance filter and value
//! coding. Each run is a `geoml compare` run of that job under one mode.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use geoml_crds::manifest::{Manifest, ManifestError};
use geoml_crds::mode::Mode;
use geoml_crds::sync_policy::{Significance, ValueCoding};
use geoml_crds::training_job::{DatasetSpec, ModelSpec, StoppingRule};

use crate::compare::run_mode;
use crate::error::{RunError, io};
use crate::options::RunOptions;
use crate::report::{Report, human_bytes, table};

/// The modes `geoml benchmark` runs by default: the ideal, naive WAN
/// synchronisation, Gaia and the averaging methods (what `geoml compare`
/// runs, without Centralized and Isolated at its end).
pub const MODES: &[Mode] = Mode::COMPARED.split_at(6).0;

/// One model family of the suite: what replaces a topology manifest's job.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Short name in the tables (`softmax`, `mlp`, `mf`).
    pub name: String,
    /// The TrainingJob's `spec.model`.
    pub model: ModelSpec,
    /// The TrainingJob's `spec.dataset`.
    pub dataset: DatasetSpec,
    /// The SyncPolicy's `spec.significance` (Gaia's filter).
    pub significance: Significance,
    /// The SyncPolicy's `spec.valueCoding` in every mode's run (Gaia's
    /// updates; `Float32` if unset). `--codings` runs Gaia with others too.
    #[serde(default)]
    pub value_coding: ValueCoding,
    /// The TrainingJob's `spec.stopping`.
    pub stopping: StoppingRule,
    /// The stopping rule of `--quick`.
    pub quick: StoppingRule,
}

/// Clocks after which `--quick` stops naive WAN BSP and SSP (their time to
/// target and bytes are then lower bounds): at a WAN round trip or more a
/// clock, uncapped they took most of a 20-minute quick run.
pub const QUICK_NAIVE_MAX_CLOCKS: u64 = 50;

/// The suite file: the workloads, in the order they run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The model families.
    pub workloads: Vec<Workload>,
}

impl Suite {
    /// The suite in `path`.
    pub fn load(path: &Path) -> Result<Self, RunError> {
        let text =
            std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
        Ok(geoml_crds::yaml::from_str(&text).map_err(ManifestError::Yaml)?)
    }
}

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct BenchmarkOptions {
    /// Where and how each run goes (its manifest is replaced per run).
    pub run: RunOptions,
    /// Topology manifests, each a job of the benchmark's shape.
    pub topologies: Vec<PathBuf>,
    /// The workloads.
    pub suite: Suite,
    /// Modes, LAN first: ratios are against LAN and naive BSP.
    pub modes: Vec<Mode>,
    /// LAN runs per workload and topology, with seeds 42, 43, ...
    pub seeds: u64,
    /// Value codings of Gaia's updates to measure, on the first topology.
    pub codings: Vec<ValueCoding>,
    /// Use each workload's `quick` stopping rule.
    pub quick: bool,
    /// Stop naive WAN BSP and SSP after at most this many clocks; their time
    /// to target and bytes are then lower bounds.
    pub naive_max_clocks: Option<u64>,
}

/// One LAN run of a seed.
#[derive(Clone, Debug, Serialize)]
pub struct SeedRun {
    /// The seed.
    pub seed: u64,
    /// Its final metric.
    pub final_metric: Option<f64>,
    /// Its time to target.
    pub time_to_target_seconds: Option<f64>,
}

/// A workload on one topology: every mode's report and LAN's seeds.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadRuns {
    /// The workload's name.
    pub workload: String,
    /// Gaia's significance threshold.
    pub threshold: f64,
    /// Gaia's value coding.
    pub value_coding: ValueCoding,
    /// Each mode's report, in the order they ran.
    pub modes: Vec<Report>,
    /// LAN with every seed (the first is the LAN run of `modes`).
    pub lan_seeds: Vec<SeedRun>,
}

/// Every workload on one topology.
#[derive(Clone, Debug, Serialize)]
pub struct TopologyRuns {
    /// The topology manifest.
    pub topology: String,
    /// Its datacenters.
    pub datacenters: usize,
    /// Per workload.
    pub workloads: Vec<WorkloadRuns>,
}

/// Gaia with one value coding.
#[derive(Clone, Debug, Serialize)]
pub struct CodingRun {
    /// The workload's name.
    pub workload: String,
    /// The coding.
    pub coding: ValueCoding,
    /// The run's report.
    pub report: Report,
}

/// What `geoml benchmark --json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct Benchmark {
    /// Per topology.
    pub topologies: Vec<TopologyRuns>,
    /// Gaia per value coding, on the first topology.
    pub codings: Vec<CodingRun>,
}

/// The manifest `topology` (multi-document YAML) with its TrainingJob's
/// model, data set, stopping rule (the quick one if `quick`) and name, and
/// its SyncPolicy's significance filter and value coding, taken from
/// `workload`.
pub fn job_manifest(
    topology: &str,
    workload: &Workload,
    quick: bool,
    coding: ValueCoding,
) -> Result<String, RunError> {
    let mut documents = geoml_crds::yaml::documents(topology).map_err(ManifestError::Yaml)?;
    let stopping = if quick {
        &workload.quick
    } else {
        &workload.stopping
    };
    let datacenters = documents
        .iter()
        .filter(|d| d["kind"] == "Datacenter")
        .count();
    for doc in &mut documents {
        let kind = doc["kind"].as_str().map(str::to_owned);
        match kind.as_deref() {
            Some("TrainingJob") => {
                doc["metadata"]["name"] = json!(format!("{}-{datacenters}dc", workload.name));
                let spec = doc.get_mut("spec").and_then(Value::as_object_mut).ok_or(
                    RunError::Unsupported("the topology's TrainingJob has no spec"),
                )?;
                spec.insert("model".into(), serde_json::to_value(&workload.model)?);
                spec.insert("dataset".into(), serde_json::to_value(&workload.dataset)?);
                spec.insert("stopping".into(), serde_json::to_value(stopping)?);
            }
            Some("SyncPolicy") => {
                let spec = doc
                    .get_mut("spec")
                    .and_then(Value::as_object_mut)
                    .ok_or(RunError::SyncPolicyWithoutSpec)?;
                spec.insert(
                    "significance".into(),
                    serde_json::to_value(&workload.significance)?,
                );
                spec.insert("valueCoding".into(), serde_json::to_value(coding)?);
            }
            _ => {}
        }
    }
    let text = geoml_crds::yaml::to_stream(&documents)?;
    Manifest::from_yaml(&text)?.job()?;
    Ok(text)
}

/// `text` with the TrainingJob's `maxClocks` lowered to `cap`.
fn with_max_clocks(text: &str, cap: u64) -> Result<String, RunError> {
    let mut documents = geoml_crds::yaml::documents(text).map_err(ManifestError::Yaml)?;
    for doc in &mut documents {
        if doc["kind"] == "TrainingJob"
            && let Some(stopping) = doc.pointer_mut("/spec/stopping")
        {
            let max = stopping["maxClocks"].as_u64().unwrap_or(cap).min(cap);
            stopping["maxClocks"] = json!(max);
        }
    }
    Ok(geoml_crds::yaml::to_stream(&documents)?)
}

fn create_dir(dir: &Path) -> Result<(), RunError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))
}

/// Runs the benchmark: for every topology and workload, every mode once and
/// LAN with every further seed; then Gaia with every value coding on the
/// first topology. Each run has its own directory under
/// `options.run.work_dir`.
pub async fn benchmark(options: &BenchmarkOptions) -> Result<Benchmark, RunError> {
    let mut result = Benchmark {
        topologies: Vec::new(),
        codings: Vec::new(),
    };
    for (t, topology_path) in options.topologies.iter().enumerate() {
        let topology = std::fs::read_to_string(topology_path)
            .map_err(io(format!("reading {}", topology_path.display())))?;
        let mut runs = TopologyRuns {
            topology: topology_path.display().to_string(),
            datacenters: 0,
            workloads: Vec::new(),
        };
        for workload in &options.suite.workloads {
            let text = job_manifest(&topology, workload, options.quick, workload.value_coding)?;
            let dir = options.run.work_dir.join(format!("{t}-{}", workload.name));
            create_dir(&dir)?;
            let run = RunOptions {
                work_dir: dir.clone(),
                ..options.run.clone()
            };
            let mut modes = Vec::new();
            for &mode in &options.modes {
                eprintln!("== {} · {} · {}", runs.topology, workload.name, mode.name());
                let naive = matches!(mode, Mode::BspWan | Mode::SspWan);
                let text = match options.naive_max_clocks {
                    Some(cap) if naive => with_max_clocks(&text, cap)?,
                    _ => text.clone(),
                };
                let report = run_mode(&run, &text, mode, false).await?;
                runs.datacenters = report.per_datacenter.len().max(runs.datacenters);
                modes.push(report);
            }
            let mut lan_seeds: Vec<SeedRun> = modes
                .iter()
                .filter(|r| r.mode == Mode::Lan.name())
                .map(|r| SeedRun {
                    seed: options.run.seed,
                    final_metric: r.final_metric,
                    time_to_target_seconds: r.time_to_target_seconds,
                })
                .collect();
            for seed in (options.run.seed + 1)..(options.run.seed + options.seeds) {
                eprintln!(
                    "== {} · {} · lan, seed {seed}",
                    runs.topology, workload.name
                );
                let run = RunOptions {
                    work_dir: dir.join(format!("seed-{seed}")),
                    seed,
                    ..options.run.clone()
                };
                let r = run_mode(&run, &text, Mode::Lan, false).await?;
                lan_seeds.push(SeedRun {
                    seed,
                    final_metric: r.final_metric,
                    time_to_target_seconds: r.time_to_target_seconds,
                });
            }
            runs.workloads.push(WorkloadRuns {
                workload: workload.name.clone(),
                threshold: workload.significance.threshold,
                value_coding: workload.value_coding,
                modes,
                lan_seeds,
            });
        }
        if t == 0 {
            for workload in &options.suite.workloads {
                for &coding in &options.codings {
                    eprintln!(
                        "== {} · {} · gaia, {coding:?}",
                        runs.topology, workload.name
                    );
                    let text = job_manifest(&topology, workload, options.quick, coding)?;
                    let run = RunOptions {
                        work_dir: options
                            .run
                            .work_dir
                            .join(format!("coding-{}-{coding:?}", workload.name)),
                        ..options.run.clone()
                    };
                    let report = run_mode(&run, &text, Mode::Gaia, false).await?;
                    result.codings.push(CodingRun {
                        workload: workload.name.clone(),
                        coding,
                        report,
                    });
                }
            }
        }
        result.topologies.push(runs);
    }
    Ok(result)
}

/// `a / b` as `12.3×`, or `≥ 12.3×` when `at_least`; `-` without both.
fn times(a: Option<f64>, b: Option<f64>, at_least: bool) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 && b > 0.0 => {
            format!("{}{:.2}×", if at_least { "≥ " } else { "" }, a / b)
        }
        _ => "-".to_owned(),
    }
}

/// A run's time to target, or for one that did not reach it, the training
/// time of its last evaluation (a lower bound) and `true`.
fn time_to_target(r: &Report) -> (Option<f64>, bool) {
    match r.time_to_target_seconds {
        Some(s) => (Some(s), false),
        None => (r.metric_history.last().map(|s| s.seconds), true),
    }
}

fn metric(m: Option<f64>) -> String {
    m.map_or("-".to_owned(), |m| format!("{m:.4}"))
}

/// Min and max of `values`.
fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

impl WorkloadRuns {
    /// Rows of the topology table: time to target and CPU against LAN,
    /// naive BSP's time and WAN bytes (to target, and of the whole run)
    /// against each mode's.
    #[allow(clippy::cast_precision_loss)] // byte counts, for display
    fn rows(&self) -> Vec<Vec<String>> {
        let lan = self.modes.iter().find(|r| r.mode == Mode::Lan.name());
        let bsp = self.modes.iter().find(|r| r.mode == Mode::BspWan.name());
        let (lan_time, _) = lan.map_or((None, false), time_to_target);
        let (bsp_time, bsp_short) = bsp.map_or((None, false), time_to_target);
        // Without a target, the whole run: a lower bound for naive BSP.
        let to_target = |r: &Report| r.wan_bytes_to_target.unwrap_or(r.wan_bytes_total) as f64;
        self.modes
            .iter()
            .map(|r| {
                let reached = r.time_to_target_seconds;
                let time = reached.map_or_else(
                    || format!("> {:.1} s", time_to_target(r).0.unwrap_or(0.0)),
                    |s| format!("{s:.1} s"),
                );
                let delta = match (r.final_metric, lan.and_then(|l| l.final_metric)) {
                    (Some(a), Some(b)) => format!("{:+.4}", a - b),
                    _ => "-".to_owned(),
                };
                let fewer = |of: &dyn Fn(&Report) -> f64| {
                    if r.wan_bytes_total == 0 {
                        "-".to_owned()
                    } else {
                        times(bsp.map(of), Some(of(r)), bsp_short && reached.is_some())
                    }
                };
                vec![
                    self.workload.clone(),
                    r.mode.clone(),
                    time,
                    times(reached, lan_time, false),
                    times(bsp_time, reached, bsp_short),
                    metric(r.final_metric),
                    delta,
                    r.clocks.to_string(),
                    times(r.cpu_seconds, lan.and_then(|l| l.cpu_seconds), false),
                    r.wan_bytes_to_target
                        .filter(|_| r.wan_bytes_total > 0)
                        .map_or("-".to_owned(), human_bytes),
                    fewer(&to_target),
                    human_bytes(r.wan_bytes_total),
                    fewer(&|r| r.wan_bytes_total as f64),
                    r.mirrors
                        .updates_sent_fraction
                        .map_or("-".to_owned(), |f| format!("{:.1}%", 100.0 * f)),
                ]
            })
            .collect()
    }

    /// One line: LAN's final metric and time to target over its seeds.
    fn spread(&self) -> String {
        let seeds: Vec<String> = self.lan_seeds.iter().map(|s| s.seed.to_string()).collect();
        let metrics = range(self.lan_seeds.iter().filter_map(|s| s.final_metric));
        let times = range(
            self.lan_seeds
                .iter()
                .filter_map(|s| s.time_to_target_seconds),
        );
        let mut line = format!("{}: lan over seeds {}:", self.workload, seeds.join(", "));
        if let Some((lo, hi)) = metrics {
            let _ = write!(
                line,
                " final metric {lo:.4}–{hi:.4} (spread {:.4})",
                hi - lo
            );
        }
        match times {
            Some((lo, hi)) => {
                let _ = write!(line, ", to target {lo:.1}–{hi:.1} s");
            }
            None => line.push_str(", target not reached"),
        }
        let reached = self
            .lan_seeds
            .iter()
            .filter(|s| s.time_to_target_seconds.is_some())
            .count();
        let _ = write!(line, " ({reached} of {} reached it)", self.lan_seeds.len());
        line
    }
}

impl Benchmark {
    /// The tables: one per topology, LAN's spread per workload, and the
    /// value codings.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // byte counts, for display
    pub fn tables(&self) -> String {
        let mut out = String::new();
        for t in &self.topologies {
            let header = [
                "model",
                "mode",
                "to target",
                "÷lan",
                "bsp÷ (speed-up)",
                "final",
                "Δ vs lan",
                "clocks",
                "CPU ÷lan",
                "WAN bytes to target",
                "bsp÷ (fewer bytes)",
                "WAN bytes, whole run",
                "bsp÷ (whole run)",
                "sent",
            ]
            .map(str::to_owned)
            .to_vec();
            let rows = t.workloads.iter().flat_map(WorkloadRuns::rows);
            let _ = writeln!(
                out,
                "{} ({} datacenters)\n\n{}\n",
                t.topology,
                t.datacenters,
                table(header, rows)
            );
            for w in &t.workloads {
                let _ = writeln!(
                    out,
                    "{} (gaia threshold {}, {:?})",
                    w.spread(),
                    w.threshold,
                    w.value_coding
                );
            }
            out.push('\n');
        }
        if !self.codings.is_empty() {
            let header = [
                "model",
                "coding",
                "WAN bytes",
                "÷Float32",
                "sent",
                "clocks",
                "to target",
                "final",
            ]
            .map(str::to_owned)
            .to_vec();
            let rows = self.codings.iter().map(|c| {
                let float32 = self
                    .codings
                    .iter()
                    .find(|f| f.workload == c.workload && f.coding == ValueCoding::Float32)
                    .map(|f| f.report.wan_bytes_total as f64);
                let r = &c.report;
                vec![
                    c.workload.clone(),
                    format!("{:?}", c.coding),
                    human_bytes(r.wan_bytes_total),
                    float32.map_or("-".to_owned(), |f| {
                        format!("{:.2}", r.wan_bytes_total as f64 / f)
                    }),
                    r.mirrors
                        .updates_sent_fraction
                        .map_or("-".to_owned(), |f| format!("{:.1}%", 100.0 * f)),
                    r.clocks.to_string(),
                    r.time_to_target_seconds
                        .map_or("-".to_owned(), |s| format!("{s:.1} s")),
                    metric(r.final_metric),
                ]
            });
            let first = self.topologies.first().map_or("", |t| t.topology.as_str());
            let _ = writeln!(
                out,
                "gaia's value coding on {first}\n\n{}",
                table(header, rows)
            );
        }
        out
    }

    /// Writes the JSON file.
    pub fn write_json(&self, path: &Path) -> Result<(), RunError> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{MetricSample, MirrorTotals};

    const SUITE: &str = include_str!("../../manifests/benchmark/models.yaml");
    const THREE: &str = include_str!("../../manifests/examples/gaia-3dc.yaml");
    const FIVE: &str = include_str!("../../manifests/examples/gaia-5dc.yaml");

    #[test]
    fn every_workload_makes_a_valid_job_on_both_topologies() {
        let suite: Suite = geoml_crds::yaml::from_str(SUITE).unwrap();
        let names: Vec<&str> = suite.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["softmax", "mlp", "mf"]);
        for (topology, dcs) in [(THREE, 3), (FIVE, 5)] {
            for w in &suite.workloads {
                for quick in [false, true] {
                    let text = job_manifest(topology, w, quick, ValueCoding::Int8).unwrap();
                    let manifest = Manifest::from_yaml(&text).unwrap();
                    let job = manifest.job().unwrap();
                    let spec = &job.job.spec;
                    assert_eq!(spec.model, w.model);
                    assert_eq!(spec.dataset, w.dataset);
                    let stopping = if quick { &w.quick } else { &w.stopping };
                    assert_eq!(&spec.stopping, stopping);
                    assert_eq!(spec.datacenters.len(), dcs);
                    assert_eq!(job.sync_policy.spec.significance, w.significance);
                    assert_eq!(job.sync_policy.spec.value_coding, ValueCoding::Int8);
                }
            }
        }
        let capped = with_max_clocks(THREE, 40).unwrap();
        let job = Manifest::from_yaml(&capped).unwrap();
        assert_eq!(job.job().unwrap().job.spec.stopping.max_clocks, Some(40));
    }

    fn report(mode: Mode, to_target: Option<f64>, last: f64, metric: f64, wan: u64) -> Report {
        let cpu = if mode == Mode::Lan { 4.0 } else { 6.0 };
        Report {
            job: "mf-3dc".into(),
            mode: mode.name().into(),
            metric_name: "rmse".into(),
            final_metric: Some(metric),
            target_metric: Some(0.95),
            time_to_target_seconds: to_target,
            wall_seconds: last + 1.0,
            clocks: 100,
            stop_reason: String::new(),
            lan_bytes_total: 0,
            wan_bytes_total: wan,
            // The last fifth of the bytes is the final flush.
            wan_bytes_to_target: to_target.map(|_| wan / 5 * 4),
            cpu_seconds: Some(cpu),
            wan_links: Vec::new(),
            wan_link_rates: Vec::new(),
            mirrors: MirrorTotals::default(),
            shipping_seconds: None,
            parameter_servers: 3,
            workers: 6,
            per_datacenter: Vec::new(),
            metric_history: vec![MetricSample {
                seconds: last,
                clock: 100,
                metric,
            }],
            collaborative: crate::report::CollaborativeTotals::default(),
        }
    }

    #[test]
    fn tables_give_ratios_against_lan_and_naive_bsp() {
        let runs = WorkloadRuns {
            workload: "mf".into(),
            threshold: 0.2,
            value_coding: ValueCoding::Int8,
            modes: vec![
                report(Mode::Lan, Some(4.0), 4.0, 0.95, 0),
                report(Mode::BspWan, Some(80.0), 80.0, 0.949, 100_000_000),
                report(Mode::Gaia, Some(5.0), 5.0, 0.948, 4_000_000),
                report(Mode::Fedavg, None, 30.0, 0.97, 50_000_000),
            ],
            lan_seeds: vec![
                SeedRun {
                    seed: 42,
                    final_metric: Some(0.95),
                    time_to_target_seconds: Some(4.0),
                },
                SeedRun {
                    seed: 43,
                    final_metric: Some(0.948),
                    time_to_target_seconds: Some(5.0),
                },
            ],
        };
        let rows = runs.rows();
        // Gaia: 1.25× LAN's time, 16× sooner than BSP, 1.5× its CPU, 25×
        // fewer bytes to target and in the whole run.
        assert_eq!(rows[2][3], "1.25×");
        assert_eq!(rows[2][4], "16.00×");
        assert_eq!(rows[2][8], "1.50×");
        assert_eq!(rows[2][9], "3.2 MB");
        assert_eq!(rows[2][10], "25.00×");
        assert_eq!(rows[2][12], "25.00×");
        assert_eq!(rows[2][6], "-0.0020");
        // FedAvg never reached the target.
        assert_eq!(rows[3][2], "> 30.0 s");
        assert_eq!(rows[3][4], "-");
        assert_eq!(
            runs.spread(),
            "mf: lan over seeds 42, 43: final metric 0.9480–0.9500 (spread 0.0020), \
             to target 4.0–5.0 s (2 of 2 reached it)"
        );

        // Naive BSP stopped short of the target: its ratios are lower bounds,
        // against its whole run.
        let mut capped = runs.clone();
        capped.modes[1] = report(Mode::BspWan, None, 60.0, 1.01, 50_000_000);
        let rows = capped.rows();
        assert_eq!(rows[2][4], "≥ 12.00×");
        assert_eq!(rows[2][10], "≥ 15.62×");
        assert_eq!(rows[2][12], "≥ 12.50×");

        let benchmark = Benchmark {
            topologies: vec![TopologyRuns {
                topology: "gaia-3dc.yaml".into(),
                datacenters: 3,
                workloads: vec![runs],
            }],
            codings: vec![
                CodingRun {
                    workload: "mf".into(),
                    coding: ValueCoding::Float32,
                    report: report(Mode::Gaia, Some(5.0), 5.0, 0.948, 4_000_000),
                },
                CodingRun {
                    workload: "mf".into(),
                    coding: ValueCoding::Int8,
                    report: report(Mode::Gaia, Some(5.0), 5.0, 0.949, 2_000_000),
                },
            ],
        };
        let tables = benchmark.tables();
        assert!(tables.contains("gaia-3dc.yaml (3 datacenters)"), "{tables}");
        assert!(tables.contains("(gaia threshold 0.2, Int8)"), "{tables}");
        assert!(
            tables.contains("| mf    |    Int8 |    2.0 MB |     0.50 |"),
            "{tables}"
        );
    }
}
