//! `geoml run`: a manifest's TrainingJob on this machine, as real `geoml ps`
//! and `geoml worker` processes talking gRPC over loopback.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use geoml_crds::sync_policy::InterDatacenterModel;
use indicatif::{ProgressBar, ProgressStyle};
use kube::ResourceExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::manifest::{Manifest, ManifestError, ResolvedJob};
use crate::pb;
use crate::worker::connect;

/// What can go wrong running a job locally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The job asks for something local runs do not support yet.
    #[error("{0}")]
    Unsupported(String),
    /// A process could not be started or watched.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A process failed; carries the end of its log.
    #[error("{role} exited with {status}; last log lines:\n{log}")]
    Failed {
        /// `ps-0`, `worker-3`, ...
        role: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// A parameter server did not answer.
    #[error("parameter server {shard}: {message}")]
    Unreachable {
        /// The shard.
        shard: usize,
        /// Why.
        message: String,
    },
    /// The report could not be written.
    #[error("writing the report: {0}")]
    Report(#[from] serde_json::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let context = context.into();
    move |source| RunError::Io { context, source }
}

/// The name `geoml compare` and reports use for an inter-datacenter model.
#[must_use]
pub fn mode_name(model: InterDatacenterModel) -> &'static str {
    match model {
        InterDatacenterModel::Lan => "lan",
        InterDatacenterModel::Bsp => "bsp-wan",
        InterDatacenterModel::Ssp => "ssp-wan",
        InterDatacenterModel::Asp => "gaia",
        InterDatacenterModel::FedAvg => "fedavg",
        InterDatacenterModel::Centralized => "centralized",
        InterDatacenterModel::Isolated => "isolated",
        InterDatacenterModel::Collaborative => "cartel",
    }
}

/// One evaluation of the model during a run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetricSample {
    /// Seconds since the parameter servers started serving.
    pub seconds: f64,
    /// Clock of the evaluating worker.
    pub clock: u64,
    /// The metric.
    pub metric: f64,
}

/// The `--json` report of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The TrainingJob's name.
    pub job: String,
    /// `lan`, `gaia`, `bsp-wan`, ...
    pub mode: String,
    /// `accuracy` or `rmse`.
    pub metric_name: String,
    /// Last evaluation.
    pub final_metric: Option<f64>,
    /// The stopping rule's target, if any.
    pub target_metric: Option<f64>,
    /// Seconds from the start of training to the first evaluation that met
    /// the target; `None` if it was never met.
    pub time_to_target_seconds: Option<f64>,
    /// Seconds of the whole run, start-up included.
    pub wall_seconds: f64,
    /// Clocks the slowest worker completed.
    pub clocks: u64,
    /// Why training stopped.
    pub stop_reason: String,
    /// Bytes between workers and parameter servers (gRPC payloads, both ways).
    pub lan_bytes_total: u64,
    /// Bytes between datacenters.
    pub wan_bytes_total: u64,
    /// Parameter-server processes.
    pub parameter_servers: usize,
    /// Worker processes.
    pub workers: usize,
    /// Every evaluation, oldest first.
    pub metric_history: Vec<MetricSample>,
    /// Collaborative modes: mean over drift events of the batches until
    /// accuracy is back within 2 points of its pre-drift level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptation_batches: Option<f64>,
    /// Collaborative modes: model bytes per site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_bytes: Option<u64>,
    /// Collaborative modes: seconds spent training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_seconds: Option<f64>,
}

impl Report {
    /// The report as a table for the terminal.
    #[must_use]
    pub fn table(&self) -> String {
        let mut t = String::new();
        let metric = self
            .final_metric
            .map_or("-".to_owned(), |m| format!("{m:.4}"));
        let target = match (self.target_metric, self.time_to_target_seconds) {
            (Some(target), Some(s)) => format!(" (target {target} reached after {s:.1} s)"),
            (Some(target), None) => format!(" (target {target} not reached)"),
            _ => String::new(),
        };
        let _ = writeln!(t, "job          {}", self.job);
        let _ = writeln!(t, "mode         {}", self.mode);
        let _ = writeln!(
            t,
            "processes    {} parameter servers, {} workers",
            self.parameter_servers, self.workers
        );
        let _ = writeln!(t, "stopped      {}", self.stop_reason);
        let _ = writeln!(t, "clocks       {}", self.clocks);
        let _ = writeln!(t, "{:<12} {metric}{target}", self.metric_name);
        let _ = writeln!(t, "wall time    {:.1} s", self.wall_seconds);
        let _ = writeln!(t, "LAN bytes    {}", human_bytes(self.lan_bytes_total));
        let _ = writeln!(t, "WAN bytes    {}", human_bytes(self.wan_bytes_total));
        t
    }
}

/// `1234567` as `1.2 MB`.
#[must_use]
pub fn human_bytes(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // for display only
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// How to run a job locally.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The `geoml` binary to start roles with.
    pub geoml: PathBuf,
    /// The manifest file.
    pub manifest: PathBuf,
    /// Where logs and checkpoints go.
    pub work_dir: PathBuf,
    /// Where data sets are cached.
    pub data_dir: PathBuf,
    /// Evaluate every this many clocks.
    pub eval_every: u64,
    /// Draw a progress bar.
    pub progress: bool,
}

/// The processes of a job running on this machine.
pub struct LocalCluster {
    options: RunOptions,
    parameter_servers: Vec<(Vec<String>, Child)>,
    ps_addresses: Vec<String>,
    workers: Vec<Child>,
}

fn free_port() -> Result<u16, RunError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port())
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl LocalCluster {
    /// Starts the parameter servers and workers of `job` and waits until
    /// every parameter server answers.
    pub async fn start(options: RunOptions, job: &ResolvedJob<'_>) -> Result<Self, RunError> {
        let spec = &job.job.spec;
        let model = job.sync_policy.spec.inter_datacenter.model;
        if spec.datacenters.len() > 1 && model != InterDatacenterModel::Lan {
            return Err(RunError::Unsupported(format!(
                "{} datacenters in mode {}: local runs support one datacenter, or mode lan, for now",
                spec.datacenters.len(),
                mode_name(model)
            )));
        }
        // LAN: all datacenters as one.
        let shards: usize = spec
            .datacenters
            .iter()
            .map(|d| usize::try_from(d.parameter_servers).unwrap_or(1))
            .sum();
        let workers: usize = spec
            .datacenters
            .iter()
            .map(|d| usize::try_from(d.workers).unwrap_or(1))
            .sum();
        std::fs::create_dir_all(options.work_dir.join("logs"))
            .map_err(io("creating the work directory"))?;

        let mut cluster = Self {
            options,
            parameter_servers: Vec::new(),
            ps_addresses: Vec::new(),
            workers: Vec::new(),
        };
        for shard in 0..shards {
            let port = free_port()?;
            cluster
                .ps_addresses
                .push(format!("http://127.0.0.1:{port}"));
            let mut args = vec![
                "ps".to_owned(),
                format!("--shard={shard}"),
                format!("--shards={shards}"),
                format!("--workers={workers}"),
                format!("--listen=127.0.0.1:{port}"),
            ];
            if spec.checkpoint.is_some() {
                let dir = cluster.options.work_dir.join(format!("ps-{shard}"));
                args.push(format!("--checkpoint-dir={}", dir.display()));
            }
            let child = cluster.spawn(&format!("ps-{shard}"), &args)?;
            cluster.parameter_servers.push((args, child));
        }
        cluster.wait_for_parameter_servers().await?;
        for index in 0..workers {
            let args = vec![
                "worker".to_owned(),
                format!("--index={index}"),
                format!("--workers={workers}"),
                format!("--ps={}", cluster.ps_addresses.join(",")),
                format!("--eval-every={}", cluster.options.eval_every),
            ];
            let child = cluster.spawn(&format!("worker-{index}"), &args)?;
            cluster.workers.push(child);
        }
        Ok(cluster)
    }

    fn log_path(&self, role: &str) -> PathBuf {
        self.options
            .work_dir
            .join("logs")
            .join(format!("{role}.log"))
    }

    fn spawn(&self, role: &str, args: &[String]) -> Result<Child, RunError> {
        let log_path = self.log_path(role);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let err = log.try_clone().map_err(io("duplicating a log handle"))?;
        Command::new(&self.options.geoml)
            .args(args)
            .arg(format!("--manifest={}", self.options.manifest.display()))
            .arg(format!("--data-dir={}", self.options.data_dir.display()))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {role}")))
    }

    async fn wait_for_parameter_servers(&mut self) -> Result<(), RunError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        for shard in 0..self.ps_addresses.len() {
            loop {
                if self.status(shard).await.is_ok() {
                    break;
                }
                if let Some(status) = self.parameter_servers[shard]
                    .1
                    .try_wait()
                    .map_err(io("watching a parameter server"))?
                {
                    return Err(RunError::Failed {
                        role: format!("ps-{shard}"),
                        status,
                        log: log_tail(&self.log_path(&format!("ps-{shard}"))),
                    });
                }
                if Instant::now() > deadline {
                    return Err(RunError::Unreachable {
                        shard,
                        message: "did not answer within 120 s".to_owned(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Addresses of the parameter servers, in shard order.
    #[must_use]
    pub fn parameter_server_addresses(&self) -> &[String] {
        &self.ps_addresses
    }

    /// The status of shard `shard`.
    pub async fn status(&self, shard: usize) -> Result<pb::StatusResponse, RunError> {
        let unreachable = |message: String| RunError::Unreachable { shard, message };
        let mut client = connect(&self.ps_addresses[shard..=shard])
            .map_err(|e| unreachable(e.to_string()))?
            .remove(0);
        let request = tonic::Request::new(pb::StatusRequest {});
        Ok(client
            .status(request)
            .await
            .map_err(|e| unreachable(e.message().to_owned()))?
            .into_inner())
    }

    /// Kills parameter server `shard` at once (SIGKILL), as a crash would.
    pub async fn kill_parameter_server(&mut self, shard: usize) -> Result<(), RunError> {
        let child = &mut self.parameter_servers[shard].1;
        child
            .kill()
            .await
            .map_err(io(format!("killing ps-{shard}")))
    }

    /// Starts parameter server `shard` again with the same arguments; it
    /// restores from its checkpoint and write-ahead log.
    pub async fn restart_parameter_server(&mut self, shard: usize) -> Result<(), RunError> {
        let args = self.parameter_servers[shard].0.clone();
        self.parameter_servers[shard].1 = self.spawn(&format!("ps-{shard}"), &args)?;
        self.wait_for_parameter_servers().await
    }

    /// Waits until every worker has exited, watching progress on shard 0.
    pub async fn wait(&mut self, max_clocks: Option<u64>) -> Result<(), RunError> {
        let bar = if self.options.progress {
            let bar = max_clocks.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} clock {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let mut exited = vec![false; self.workers.len()];
        while exited.iter().any(|e| !e) {
            for (index, worker) in self.workers.iter_mut().enumerate() {
                if exited[index] {
                    continue;
                }
                if let Some(status) = worker.try_wait().map_err(io("watching a worker"))? {
                    if !status.success() {
                        bar.abandon();
                        return Err(RunError::Failed {
                            role: format!("worker-{index}"),
                            status,
                            log: log_tail(&self.log_path(&format!("worker-{index}"))),
                        });
                    }
                    exited[index] = true;
                }
            }
            if let Ok(status) = self.status(0).await {
                bar.set_position(status.min_clock);
                if let Some(last) = status.metrics.last() {
                    bar.set_message(format!("metric {:.4}", last.metric));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bar.finish();
        Ok(())
    }

    /// Stops the parameter servers gracefully (SIGTERM: they write a final
    /// checkpoint) and returns the status of every shard just before.
    pub async fn shutdown(mut self) -> Result<Vec<pb::StatusResponse>, RunError> {
        let mut statuses = Vec::new();
        for shard in 0..self.ps_addresses.len() {
            statuses.push(self.status(shard).await?);
        }
        for (shard, (_, child)) in self.parameter_servers.iter_mut().enumerate() {
            if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
                // The process may have exited already; then there is nothing to stop.
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .map_err(|_| RunError::Unreachable {
                    shard,
                    message: "did not stop within 30 s of SIGTERM".to_owned(),
                })?
                .map_err(io(format!("waiting for ps-{shard}")))?;
            if !status.success() {
                return Err(RunError::Failed {
                    role: format!("ps-{shard}"),
                    status,
                    log: log_tail(&self.log_path(&format!("ps-{shard}"))),
                });
            }
        }
        Ok(statuses)
    }
}

/// Runs the manifest's job to completion and returns its report.
pub async fn run(options: RunOptions) -> Result<Report, RunError> {
    let started = Instant::now();
    let manifest = Manifest::load(&options.manifest)?;
    let job = manifest.job()?;
    if job.sync_policy.spec.inter_datacenter.model == InterDatacenterModel::Collaborative {
        return crate::cartel::run(&options, crate::cartel::Mode::Cartel)
            .await
            .map_err(|e| RunError::Unsupported(e.to_string()));
    }
    let spec = &job.job.spec;
    // Loading here fetches the data set once, before the roles start and
    // load it from the cache, and tells the metric's name and direction.
    let model = crate::model::build(
        &spec.model,
        &crate::data::load(spec.dataset.name, &options.data_dir)
            .map_err(|e| RunError::Unsupported(e.to_string()))?,
    )
    .map_err(|e| RunError::Unsupported(e.to_string()))?;
    let max_clocks = spec.stopping.max_clocks.and_then(|c| u64::try_from(c).ok());
    let mut cluster = LocalCluster::start(options, &job).await?;
    cluster.wait(max_clocks).await?;
    let parameter_servers = cluster.ps_addresses.len();
    let workers = cluster.workers.len();
    let statuses = cluster.shutdown().await?;
    Ok(report(
        &job,
        &statuses,
        model.metric_name(),
        model.higher_is_better(),
        started.elapsed(),
        parameter_servers,
        workers,
    ))
}

fn report(
    job: &ResolvedJob<'_>,
    statuses: &[pb::StatusResponse],
    metric_name: &str,
    higher_is_better: bool,
    wall: Duration,
    parameter_servers: usize,
    workers: usize,
) -> Report {
    let shard0 = statuses.first().cloned().unwrap_or_default();
    let target = job.job.spec.stopping.target_metric;
    let met = |m: f64| target.is_some_and(|t| if higher_is_better { m >= t } else { m <= t });
    let history: Vec<MetricSample> = shard0
        .metrics
        .iter()
        .map(|p| MetricSample {
            seconds: p.seconds,
            clock: p.clock,
            metric: p.metric,
        })
        .collect();
    Report {
        job: job.job.name_any(),
        mode: mode_name(job.sync_policy.spec.inter_datacenter.model).to_owned(),
        metric_name: metric_name.to_owned(),
        final_metric: history.last().map(|s| s.metric),
        target_metric: target,
        time_to_target_seconds: history.iter().find(|s| met(s.metric)).map(|s| s.seconds),
        wall_seconds: wall.as_secs_f64(),
        clocks: shard0.min_clock,
        stop_reason: shard0.stop_reason,
        lan_bytes_total: statuses
            .iter()
            .map(|s| s.bytes_received + s.bytes_sent)
            .sum(),
        wan_bytes_total: 0,
        parameter_servers,
        workers,
        metric_history: history,
        adaptation_batches: None,
        model_bytes: None,
        training_seconds: None,
    }
}
