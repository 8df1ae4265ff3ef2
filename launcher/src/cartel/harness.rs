//! [`run`]: a Collaborative job on this machine — the registry and every
//! site as real `geoml registry` / `geoml site` processes over loopback in
//! the `cartel` and `isolated` modes, the `centralized` and `global`
//! baselines in this process — and the report: adaptation after drift,
//! bytes moved, model size, training time and accuracy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use geoml_crds::identity::{Identity, Role};
use geoml_crds::manifest::Manifest;
use geoml_crds::mode::CollaborativeMode;
use geoml_crds::roles::{RegistryArgs, SiteArgs};
use geoml_dataplane::cartel::SiteConfig;
use geoml_dataplane::cartel::scenario::Scenario;
use geoml_dataplane::cartel::site::SiteReport;
use kube::ResourceExt;
use serde::Serialize;

use super::baselines;
use crate::error::{RunError, io};
use crate::options::RunOptions;
use crate::process::{Supervisor, unused_port};
use crate::report::{CollaborativeTotals, DatacenterReport, MetricSample, MirrorTotals, Report};

/// How long the sites of a run may take to finish.
const FINISH_TIMEOUT: Duration = Duration::from_secs(3600);

/// Accuracy points within which a site counts as adapted again.
pub const ADAPTED_WITHIN: f64 = 0.02;

/// Batches before a drift whose mean accuracy is the pre-drift level.
const PRE_DRIFT_BATCHES: usize = 5;

/// Batches whose mean accuracy must be back within [`ADAPTED_WITHIN`].
const RECOVERED_BATCHES: usize = 3;

/// Everything one mode's run measured.
#[derive(Clone, Debug, Serialize)]
pub struct CartelSummary {
    /// The TrainingJob.
    pub job: String,
    /// The mode.
    pub mode: String,
    /// The scenario's name.
    pub scenario: String,
    /// Sites.
    pub sites: usize,
    /// Batches of the longest site stream.
    pub batches: usize,
    /// Mean over sites of the held-out accuracy over the last tenth of the stream.
    pub accuracy_final: f64,
    /// Mean over sites and batches of the held-out accuracy.
    pub accuracy_mean: f64,
    /// Mean over drift events of the batches until accuracy is back within
    /// 2 points of its pre-drift level (censored at the next drift); `None`
    /// without drift events.
    pub adaptation_batches: Option<f64>,
    /// `(site, drift batch, batches to adapt)` of every drift event.
    pub adaptation_by_event: Vec<(String, usize, usize)>,
    /// Bytes moved between sites (and to the registry or central place).
    pub wan_bytes_total: u64,
    /// The same, by message type.
    pub bytes_by_type: BTreeMap<String, u64>,
    /// Mean over sites of the model bytes at the end.
    pub model_bytes: u64,
    /// Largest model bytes of any site during the run.
    pub model_bytes_peak: u64,
    /// Training seconds of the busiest trainer (sites train in parallel; the
    /// central place trains everything).
    pub training_seconds: f64,
    /// Drift detections over all sites.
    pub detections: usize,
    /// Borrowings of model portions over all sites.
    pub transfers: usize,
    /// Seconds of the whole run.
    pub wall_seconds: f64,
}

/// Batches after `drift` until the mean accuracy of [`RECOVERED_BATCHES`]
/// batches is back within [`ADAPTED_WITHIN`] of the mean over the
/// [`PRE_DRIFT_BATCHES`] before it; censored at `end` (the next drift or
/// the end of the stream). `None` when there is no history before the drift.
#[must_use]
pub fn adaptation(accuracy: &[f64], drift: usize, end: usize) -> Option<usize> {
    let end = end.min(accuracy.len());
    if drift == 0 || drift >= end {
        return None;
    }
    let accuracy = &accuracy[..end];
    let pre = &accuracy[drift.saturating_sub(PRE_DRIFT_BATCHES)..drift];
    #[allow(clippy::cast_precision_loss)] // a handful of batches
    let level = pre.iter().sum::<f64>() / pre.len() as f64;
    let recovered = (drift..accuracy.len()).find(|&b| {
        let after = &accuracy[b..(b + RECOVERED_BATCHES).min(accuracy.len())];
        #[allow(clippy::cast_precision_loss)] // a handful of batches
        let mean = after.iter().sum::<f64>() / after.len() as f64;
        mean >= level - ADAPTED_WITHIN
    });
    Some(recovered.unwrap_or(accuracy.len()) - drift)
}

#[allow(clippy::cast_precision_loss)] // means of small counts
fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Mean held-out accuracy over the last tenth of a site's stream.
fn tail_accuracy(r: &SiteReport) -> Option<f64> {
    let from = r.accuracy.len() - r.accuracy.len().div_ceil(10);
    mean(r.accuracy[from..].iter().copied())
}

/// A site's accuracy after every `every`-th batch.
fn history(r: &SiteReport, every: usize) -> Vec<MetricSample> {
    r.accuracy
        .iter()
        .zip(&r.seconds)
        .enumerate()
        .step_by(every)
        .map(|(b, (&metric, &seconds))| MetricSample {
            seconds,
            clock: b as u64 + 1,
            metric,
        })
        .collect()
}

/// Sums up the reports of one mode's sites.
#[must_use]
pub fn summarise(
    job: &str,
    mode: CollaborativeMode,
    scenario: &str,
    reports: &[SiteReport],
    central_training_seconds: Option<f64>,
    wall: Duration,
) -> CartelSummary {
    let mut events = Vec::new();
    for r in reports {
        for (i, &d) in r.drifts.iter().enumerate() {
            let end = r.drifts.get(i + 1).copied().unwrap_or(r.accuracy.len());
            if let Some(a) = adaptation(&r.accuracy, d, end) {
                events.push((r.site.clone(), d, a));
            }
        }
    }
    let mut bytes_by_type = BTreeMap::new();
    for r in reports {
        for (k, v) in &r.bytes_by_type {
            *bytes_by_type.entry(k.clone()).or_insert(0) += v;
        }
    }
    let tail = |r: &SiteReport| tail_accuracy(r).unwrap_or(0.0);
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let model_bytes =
        mean(reports.iter().map(|r| r.model_bytes_final as f64)).unwrap_or(0.0) as u64;
    CartelSummary {
        job: job.to_owned(),
        mode: mode.name().to_owned(),
        scenario: scenario.to_owned(),
        sites: reports.len(),
        batches: reports.iter().map(|r| r.accuracy.len()).max().unwrap_or(0),
        accuracy_final: mean(reports.iter().map(tail)).unwrap_or(0.0),
        accuracy_mean: mean(reports.iter().flat_map(|r| r.accuracy.iter().copied())).unwrap_or(0.0),
        #[allow(clippy::cast_precision_loss)] // batch counts
        adaptation_batches: mean(events.iter().map(|e| e.2 as f64)),
        adaptation_by_event: events,
        wan_bytes_total: bytes_by_type.values().sum(),
        bytes_by_type,
        model_bytes,
        model_bytes_peak: reports.iter().map(|r| r.model_bytes_peak).max().unwrap_or(0),
        training_seconds: central_training_seconds.unwrap_or_else(|| {
            reports
                .iter()
                .map(|r| r.training_seconds)
                .fold(0.0, f64::max)
        }),
        detections: reports.iter().map(|r| r.detections.len()).sum(),
        transfers: reports.iter().map(|r| r.transfers.len()).sum(),
        wall_seconds: wall.as_secs_f64(),
    }
}

impl CartelSummary {
    /// The summary as a `geoml run` report.
    #[must_use]
    pub fn report(&self, reports: &[SiteReport], eval_every: u64) -> Report {
        let every = usize::try_from(eval_every).unwrap_or(usize::MAX);
        let mean_history = (0..self.batches)
            .step_by(every)
            .filter_map(|b| {
                let metric = mean(reports.iter().filter_map(|r| r.accuracy.get(b).copied()))?;
                let seconds = reports
                    .first()
                    .and_then(|r| r.seconds.get(b).copied())
                    .unwrap_or(0.0);
                Some(MetricSample {
                    seconds,
                    clock: b as u64 + 1,
                    metric,
                })
            })
            .collect();
        Report {
            job: self.job.clone(),
            mode: self.mode.clone(),
            metric_name: "accuracy".to_owned(),
            final_metric: Some(self.accuracy_final),
            target_metric: None,
            time_to_target_seconds: None,
            wall_seconds: self.wall_seconds,
            clocks: self.batches as u64,
            stop_reason: "end of every site's stream".to_owned(),
            lan_bytes_total: 0,
            wan_bytes_total: self.wan_bytes_total,
            wan_bytes_to_target: None,
            cpu_seconds: None,
            // Bytes are counted by message type at the application level,
            // not per link; see `CartelSummary::bytes_by_type`.
            wan_links: Vec::new(),
            wan_link_rates: Vec::new(),
            mirrors: MirrorTotals::default(),
            shipping_seconds: None,
            parameter_servers: 0,
            workers: self.sites,
            per_datacenter: reports
                .iter()
                .map(|r| DatacenterReport {
                    name: r.site.clone(),
                    clocks: r.accuracy.len() as u64,
                    final_metric: tail_accuracy(r),
                    time_to_target_seconds: None,
                    metric_history: history(r, every),
                })
                .collect(),
            metric_history: mean_history,
            collaborative: CollaborativeTotals {
                adaptation_batches: self.adaptation_batches,
                model_bytes: Some(self.model_bytes),
                training_seconds: Some(self.training_seconds),
            },
        }
    }
}

/// Runs `options`' Collaborative job in `mode` and returns its report.
pub async fn run(options: &RunOptions, mode: CollaborativeMode) -> Result<Report, RunError> {
    Ok(run_detailed(options, mode).await?.0)
}

/// [`run`], with the full summary and every site's report.
pub async fn run_detailed(
    options: &RunOptions,
    mode: CollaborativeMode,
) -> Result<(Report, CartelSummary, Vec<SiteReport>), RunError> {
    if !options.faults.is_empty() {
        return Err(RunError::Unsupported(
            "--fault needs the WAN proxy of a job with parameter servers; Collaborative jobs have none",
        ));
    }
    let started = Instant::now();
    let manifest = Manifest::load(&options.manifest)?;
    let job = manifest.job()?;
    let config = SiteConfig::from_job(&job)?;
    let (scenario_name, reports, central) = match mode {
        CollaborativeMode::Cartel | CollaborativeMode::Isolated => {
            // Fetch the data once, before the sites load it from the cache.
            let scenario = Scenario::build(&job, &options.data_dir)?;
            let names: Vec<String> = scenario.sites.iter().map(|s| s.name.clone()).collect();
            let name = scenario.name.clone();
            drop(scenario);
            (name, run_processes(options, &names, mode).await?, None)
        }
        CollaborativeMode::Centralized => {
            let scenario = Scenario::build(&job, &options.data_dir)?;
            let (reports, seconds) = baselines::centralized(&scenario, config);
            (scenario.name.clone(), reports, Some(seconds))
        }
        CollaborativeMode::Global => {
            let scenario = Scenario::build(&job, &options.data_dir)?;
            (
                scenario.name.clone(),
                baselines::global(&scenario, config),
                None,
            )
        }
    };
    let summary = summarise(
        &job.job.name_any(),
        mode,
        &scenario_name,
        &reports,
        central,
        started.elapsed(),
    );
    let report = summary.report(&reports, options.eval_every);
    std::fs::create_dir_all(&options.work_dir).map_err(io("creating the work directory"))?;
    let path = options
        .work_dir
        .join(format!("cartel-{}.json", mode.name()));
    let text = serde_json::to_string_pretty(&summary)?;
    std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
    Ok((report, summary, reports))
}

/// Seconds a site waits between asking the registry whether every site
/// finished (sub-second here, so that runs do not wait on polls).
const FINISH_POLL_SECONDS: f64 = 0.2;

/// Seconds the registry keeps answering once every site finished.
const EXIT_GRACE_SECONDS: f64 = 1.0;

/// The registry and one `geoml site` per datacenter; waits for each to exit
/// on its own (the sites once every site finished, the registry after them)
/// and fails if any exits unsuccessfully.
async fn run_processes(
    options: &RunOptions,
    sites: &[String],
    mode: CollaborativeMode,
) -> Result<Vec<SiteReport>, RunError> {
    let dir = options.work_dir.join(format!("cartel-{}", mode.name()));
    std::fs::create_dir_all(&dir).map_err(io("creating the work directory"))?;
    let supervisor = Supervisor::new(
        &options.geoml,
        &options.work_dir,
        options.insecure_plaintext,
    )?;
    let mut roles = Vec::new();
    let mut registry_url = None;
    if mode == CollaborativeMode::Cartel {
        let port = unused_port()?;
        registry_url = Some(format!("http://127.0.0.1:{port}"));
        // A registry reloads its state: one left by an earlier run in this
        // directory would count that run's sites as known and finished.
        let state = dir.join("registry");
        match std::fs::remove_dir_all(&state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("removing {}", state.display()))(e));
            }
            _ => {}
        }
        let name = format!("{}-registry", mode.name());
        // The registry serves every site; it is placed with the first.
        let identity = Identity::new(
            sites.first().map_or("local", String::as_str),
            Role::Registry,
        );
        let args = RegistryArgs {
            state_dir: Some(state),
            exit_when_finished: Some(sites.len()),
            exit_grace: EXIT_GRACE_SECONDS,
            tls: supervisor.tls(&name, &identity)?,
            ..RegistryArgs::new(SocketAddr::from(([127, 0, 0, 1], port)))
        };
        roles.push(supervisor.spawn(&name, args.command_line())?);
    }
    let mut report_paths = Vec::new();
    for site in sites {
        let port = unused_port()?;
        let report = dir.join(format!("site-{site}.json"));
        let _ = std::fs::remove_file(&report);
        let mut args = SiteArgs::new(
            options.manifest.clone(),
            SocketAddr::from(([127, 0, 0, 1], port)),
            mode,
        );
        args.data.data_dir = Some(options.data_dir.clone());
        args.site = Some(site.clone());
        args.report = Some(report.clone());
        if let Some(url) = &registry_url {
            args.registry = Some(url.clone());
            args.expect_sites = sites.len();
            args.finish_poll = FINISH_POLL_SECONDS;
        }
        let name = format!("{}-site-{site}", mode.name());
        args.tls = supervisor.tls(&name, &Identity::new(site.clone(), Role::Site))?;
        roles.push(supervisor.spawn(&name, args.command_line())?);
        report_paths.push(report);
    }
    let deadline = Instant::now() + FINISH_TIMEOUT;
    let mut running: Vec<_> = roles.iter_mut().collect();
    while !running.is_empty() {
        let mut still = Vec::with_capacity(running.len());
        for role in running {
            if !role.exited()? {
                still.push(role);
            }
        }
        running = still;
        if Instant::now() > deadline {
            // Dropping the roles kills the processes left.
            return Err(RunError::Timeout {
                what: "sites".to_owned(),
                happen: "finish",
                after: FINISH_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report_paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).map_err(io(format!("reading {}", p.display())))?;
            serde_json::from_str(&text).map_err(|source| RunError::SiteReport {
                path: p.clone(),
                source,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptation_counts_batches_until_back_within_two_points() {
        let mut acc = vec![0.9; 10];
        acc.extend([0.2, 0.5, 0.8, 0.89, 0.9, 0.9, 0.9]);
        // From batch 10, the first 3-batch mean at >= 0.88 starts at 13.
        assert_eq!(adaptation(&acc, 10, acc.len()), Some(3));
        assert_eq!(adaptation(&acc, 0, acc.len()), None);
        // Censored at the next drift.
        assert_eq!(adaptation(&acc, 10, 12), Some(2));
        let never = [0.9, 0.9, 0.1, 0.1];
        assert_eq!(adaptation(&never, 2, 4), Some(2));
    }
}
