//! `geoml run`: a manifest's TrainingJob on this machine, as real `geoml ps`
//! and `geoml worker` processes talking gRPC over loopback, each datacenter's
//! traffic to the others through a `geoml wan-proxy` that emulates the WAN.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use geoml_crds::Topology;
use geoml_crds::sync_policy::InterDatacenterModel;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kube::ResourceExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::data::Examples;
use crate::manifest::{Manifest, ManifestError, ResolvedJob};
use crate::pb;
use crate::wan::{Route, WanConfig};
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
    /// Seconds since training started (for `centralized`, since the data
    /// started to move).
    pub seconds: f64,
    /// Clock of the evaluating worker.
    pub clock: u64,
    /// The metric.
    pub metric: f64,
}

/// Bytes one emulated WAN link carried.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LinkBytes {
    /// Sending datacenter.
    pub from: String,
    /// Receiving datacenter.
    pub to: String,
    /// TCP payload bytes (gRPC with its HTTP/2 framing, or shipped data).
    pub bytes: u64,
}

/// How one datacenter's model fared.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DatacenterReport {
    /// The datacenter.
    pub name: String,
    /// Clocks its slowest worker completed.
    pub clocks: u64,
    /// Last evaluation of the model its workers read.
    pub final_metric: Option<f64>,
    /// When that model first met the target.
    pub time_to_target_seconds: Option<f64>,
    /// Every evaluation of that model, oldest first.
    pub metric_history: Vec<MetricSample>,
}

/// Mirror synchronisation of a run, summed over every shard.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MirrorTotals {
    /// Of the parameter updates workers made, the fraction sent to mirrors
    /// (modes with mirrors).
    pub updates_sent_fraction: Option<f64>,
    /// Reads the selective barrier held.
    pub barrier_blocks: u64,
    /// Seconds reads waited at the selective barrier, summed.
    pub barrier_wait_seconds: f64,
    /// Reads the mirror-clock bound (or an averaging round) held.
    pub clock_blocks: u64,
    /// Seconds reads waited for the mirror-clock bound or a round, summed.
    pub clock_wait_seconds: f64,
    /// Most mirror clocks any datacenter ran ahead of its slowest peer.
    pub max_mirror_skew: u64,
}

impl MirrorTotals {
    fn of(statuses: &[pb::StatusResponse]) -> Self {
        let mirrors: Vec<&pb::MirrorStatus> =
            statuses.iter().filter_map(|s| s.mirror.as_ref()).collect();
        let updated: u64 = mirrors.iter().map(|m| m.elements_updated).sum();
        let sent: u64 = mirrors.iter().map(|m| m.elements_sent).sum();
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        Self {
            updates_sent_fraction: (updated > 0).then(|| sent as f64 / updated as f64),
            barrier_blocks: mirrors.iter().map(|m| m.barrier_blocks).sum(),
            barrier_wait_seconds: mirrors.iter().map(|m| m.barrier_wait_seconds).sum(),
            clock_blocks: mirrors.iter().map(|m| m.clock_blocks).sum(),
            clock_wait_seconds: mirrors.iter().map(|m| m.clock_wait_seconds).sum(),
            max_mirror_skew: mirrors.iter().map(|m| m.max_skew).max().unwrap_or(0),
        }
    }
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
    /// Last evaluation; with a model per datacenter, the mean over them.
    pub final_metric: Option<f64>,
    /// The stopping rule's target, if any.
    pub target_metric: Option<f64>,
    /// Seconds from the start of training until every datacenter's model
    /// met the target; `None` if one never did.
    pub time_to_target_seconds: Option<f64>,
    /// Seconds of the whole run, start-up included.
    pub wall_seconds: f64,
    /// Clocks the slowest worker completed.
    pub clocks: u64,
    /// Why training stopped.
    pub stop_reason: String,
    /// Bytes between workers and parameter servers (gRPC payloads, both ways).
    pub lan_bytes_total: u64,
    /// Bytes between datacenters: everything the emulated WAN links carried.
    pub wan_bytes_total: u64,
    /// Bytes per directed WAN link.
    pub wan_links: Vec<LinkBytes>,
    /// Mirror synchronisation, summed over shards.
    #[serde(flatten)]
    pub mirrors: MirrorTotals,
    /// Seconds spent shipping the data in (`centralized`).
    pub shipping_seconds: Option<f64>,
    /// Parameter-server processes.
    pub parameter_servers: usize,
    /// Worker processes.
    pub workers: usize,
    /// Per datacenter.
    pub per_datacenter: Vec<DatacenterReport>,
    /// Every evaluation of the first datacenter's model, oldest first.
    pub metric_history: Vec<MetricSample>,
    /// Collaborative modes: adaptation after drift, model bytes per site,
    /// training seconds (flat in the JSON, absent in other modes).
    #[serde(flatten)]
    pub collaborative: crate::cartel::CollaborativeTotals,
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
        let m = &self.mirrors;
        if let Some(fraction) = m.updates_sent_fraction {
            let _ = writeln!(t, "sent         {:.2}% of updates", 100.0 * fraction);
            let _ = writeln!(
                t,
                "barrier      {} reads held, {:.1} s",
                m.barrier_blocks, m.barrier_wait_seconds
            );
            let _ = writeln!(
                t,
                "clock bound  {} reads held, {:.1} s, max skew {}",
                m.clock_blocks, m.clock_wait_seconds, m.max_mirror_skew
            );
        }
        if let Some(s) = self.shipping_seconds {
            let _ = writeln!(t, "shipping     {s:.1} s");
        }
        if self.per_datacenter.len() > 1 {
            let _ = writeln!(
                t,
                "\n{:<16} {:>7} {:>9} {:>10}",
                "datacenter", "clocks", self.metric_name, "to target"
            );
            for dc in &self.per_datacenter {
                let _ = writeln!(
                    t,
                    "{:<16} {:>7} {:>9} {:>10}",
                    dc.name,
                    dc.clocks,
                    dc.final_metric
                        .map_or("-".to_owned(), |m| format!("{m:.4}")),
                    dc.time_to_target_seconds
                        .map_or("-".to_owned(), |s| format!("{s:.1} s")),
                );
            }
        }
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
    /// Where logs, topology files and checkpoints go.
    pub work_dir: PathBuf,
    /// Where data sets are cached.
    pub data_dir: PathBuf,
    /// Evaluate every this many clocks.
    pub eval_every: u64,
    /// Draw progress bars.
    pub progress: bool,
    /// The target time to target is measured against, when the manifest's
    /// job has none of its own (`geoml compare --full-budget` removes it so
    /// that runs use their whole clock budget).
    pub target: Option<f64>,
}

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A loopback port nobody listens on, for a role to bind. The kernel may
/// hand out a port again once its listener here is closed, so ports given
/// out before are skipped: every role of every run in this process gets
/// its own.
pub(crate) fn unused_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Hold every candidate until one is new, so the kernel offers another.
    let mut held = Vec::new();
    loop {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
        held.push(listener);
    }
}

fn free_port() -> Result<u16, RunError> {
    unused_port().map_err(io("finding a free port"))
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn write_yaml(path: &Path, value: &impl Serialize) -> Result<(), RunError> {
    let text = serde_yaml::to_string(value)
        .map_err(|e| RunError::Unsupported(format!("serialising {}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

/// A process of a local run.
struct Role {
    name: String,
    args: Vec<String>,
    child: Child,
}

/// Starts and watches the processes of a local run; logs go to
/// `work_dir/logs/<role>.log`.
struct Processes {
    options: RunOptions,
}

impl Processes {
    fn log_path(&self, role: &str) -> PathBuf {
        self.options
            .work_dir
            .join("logs")
            .join(format!("{role}.log"))
    }

    /// Starts `geoml ARGS`; `job_role` adds the manifest and data directory.
    fn spawn(&self, name: &str, args: Vec<String>, job_role: bool) -> Result<Role, RunError> {
        let log_path = self.log_path(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let err = log.try_clone().map_err(io("duplicating a log handle"))?;
        let mut command = Command::new(&self.options.geoml);
        command.args(&args);
        if job_role {
            command
                .arg(format!("--manifest={}", self.options.manifest.display()))
                .arg(format!("--data-dir={}", self.options.data_dir.display()));
        }
        let child = command
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // An error that ends a role is one line in its log, not a
            // backtrace that would push it out of the tail a failure shows.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {name}")))?;
        Ok(Role {
            name: name.to_owned(),
            args,
            child,
        })
    }

    fn failed(&self, role: &Role, status: std::process::ExitStatus) -> RunError {
        RunError::Failed {
            role: role.name.clone(),
            status,
            log: log_tail(&self.log_path(&role.name)),
        }
    }

    /// Stops `role` with SIGTERM and waits for it to exit successfully.
    async fn stop(&self, role: &mut Role) -> Result<(), RunError> {
        if let Some(pid) = role.child.id().and_then(|id| i32::try_from(id).ok()) {
            // The process may have exited already; then there is nothing to stop.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(30), role.child.wait())
            .await
            .map_err(|_| RunError::Io {
                context: format!("stopping {}", role.name),
                source: std::io::Error::other("did not stop within 30 s of SIGTERM"),
            })?
            .map_err(io(format!("waiting for {}", role.name)))?;
        if status.success() {
            Ok(())
        } else {
            Err(self.failed(role, status))
        }
    }
}

/// The emulated WAN: a `geoml wan-proxy` process.
struct Wan {
    role: Role,
    metrics: SocketAddr,
}

impl Wan {
    /// Starts a proxy for `routes` between the job's datacenters and waits
    /// until it listens.
    async fn start(
        processes: &Processes,
        job: &ResolvedJob<'_>,
        routes: Vec<Route>,
    ) -> Result<Self, RunError> {
        let ends: Vec<(String, f64, Option<f64>)> = job
            .datacenters
            .iter()
            .map(|d| {
                let wan = d.spec.wan.as_ref();
                (
                    d.name_any(),
                    wan.map_or(0.0, |w| f64::from(w.latency_ms)),
                    wan.map(|w| w.bandwidth_mbps),
                )
            })
            .collect();
        let config = WanConfig {
            links: WanConfig::mesh(&ends),
            routes,
        };
        let path = processes.options.work_dir.join("wan.yaml");
        write_yaml(&path, &config)?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut role = processes.spawn(
            "wan-proxy",
            vec![
                "wan-proxy".to_owned(),
                format!("--config={}", path.display()),
                format!("--metrics-listen={metrics}"),
            ],
            false,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(metrics).await.is_err() {
            if let Some(status) = role.child.try_wait().map_err(io("watching wan-proxy"))? {
                return Err(processes.failed(&role, status));
            }
            if Instant::now() > deadline {
                return Err(RunError::Unsupported(
                    "wan-proxy did not start within 30 s".to_owned(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { role, metrics })
    }

    /// Bytes per link so far.
    async fn link_bytes(&self) -> Result<Vec<LinkBytes>, RunError> {
        let text = crate::metrics::scrape(self.metrics)
            .await
            .map_err(io("scraping wan-proxy"))?;
        Ok(crate::wan::link_bytes(&text)
            .into_iter()
            .map(|(from, to, bytes)| LinkBytes { from, to, bytes })
            .collect())
    }
}

/// The topology of every datacenter, given the ports of each one's shards,
/// and the WAN routes they need: in the global modes workers reach other
/// datacenters' shards (over the WAN when `over_wan`); in the per-datacenter
/// modes each datacenter's workers use its own shards, and over the WAN each
/// shard reaches its mirrors.
fn wire(
    names: &[String],
    ports: &[Vec<u16>],
    global: bool,
    over_wan: bool,
) -> Result<(Vec<Topology>, Vec<Route>), RunError> {
    let direct = |port: u16| format!("http://127.0.0.1:{port}");
    let mut routes = Vec::new();
    let mut route = |from: usize, to: usize, port: u16| -> Result<String, RunError> {
        let listen = free_port()?;
        routes.push(Route {
            from: names[from].clone(),
            to: names[to].clone(),
            listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            target: SocketAddr::from(([127, 0, 0, 1], port)),
        });
        Ok(direct(listen))
    };
    let mut topologies = Vec::new();
    for (d, name) in names.iter().enumerate() {
        let mut topology = Topology {
            datacenter: name.clone(),
            ..Topology::default()
        };
        for (e, shard_ports) in ports.iter().enumerate() {
            for &port in shard_ports {
                if e == d || (global && !over_wan) {
                    topology.parameter_servers.push(direct(port));
                } else if global {
                    topology.parameter_servers.push(route(d, e, port)?);
                }
            }
            if over_wan && !global && e != d {
                let mirrors = shard_ports
                    .iter()
                    .map(|&port| route(d, e, port))
                    .collect::<Result<_, _>>()?;
                topology.mirrors.insert(names[e].clone(), mirrors);
            }
        }
        topologies.push(topology);
    }
    Ok((topologies, routes))
}

/// A datacenter of a local run.
struct Site {
    name: String,
    workers: usize,
    worker_offset: usize,
    /// Indexes into `LocalCluster::shards` of its own shards.
    shards: Vec<usize>,
}

/// The processes of a job running on this machine.
pub struct LocalCluster {
    processes: Processes,
    global: bool,
    mirrored: bool,
    sites: Vec<Site>,
    shards: Vec<Role>,
    ps_addresses: Vec<String>,
    workers: Vec<Role>,
    wan: Option<Wan>,
    /// Prometheus endpoints of the parameter servers.
    metrics: Vec<SocketAddr>,
    /// When the workers started (Unix seconds).
    started: f64,
}

impl LocalCluster {
    /// Starts the job's parameter servers (and, between datacenters, the
    /// WAN proxy), waits until every shard answers, then starts the workers.
    pub async fn start(options: RunOptions, job: &ResolvedJob<'_>) -> Result<Self, RunError> {
        let spec = &job.job.spec;
        let model = job.sync_policy.spec.inter_datacenter.model;
        if model == InterDatacenterModel::Collaborative {
            return Err(RunError::Unsupported(
                "mode cartel has no parameter servers".to_owned(),
            ));
        }
        let global = model.is_global();
        // Centralized training happens in one place once the data is there.
        let over_wan = spec.datacenters.len() > 1
            && !matches!(
                model,
                InterDatacenterModel::Lan
                    | InterDatacenterModel::Centralized
                    | InterDatacenterModel::Isolated
            );
        std::fs::create_dir_all(options.work_dir.join("logs"))
            .map_err(io("creating the work directory"))?;
        let processes = Processes { options };

        let names: Vec<String> = spec.datacenters.iter().map(|d| d.name.clone()).collect();
        let mut ports: Vec<Vec<u16>> = Vec::new();
        for dc in &spec.datacenters {
            ports.push(
                (0..dc.parameter_servers.max(0))
                    .map(|_| free_port())
                    .collect::<Result<_, _>>()?,
            );
        }
        let (topologies, routes) = wire(&names, &ports, global, over_wan)?;
        let topologies = topologies
            .iter()
            .map(|topology| {
                let path = processes
                    .options
                    .work_dir
                    .join(format!("topology-{}.yaml", topology.datacenter));
                write_yaml(&path, topology)?;
                Ok(path)
            })
            .collect::<Result<Vec<_>, RunError>>()?;
        let wan = if routes.is_empty() {
            None
        } else {
            Some(Wan::start(&processes, job, routes).await?)
        };

        let mut cluster = Self {
            processes,
            global,
            mirrored: over_wan && !global,
            sites: Vec::new(),
            shards: Vec::new(),
            ps_addresses: Vec::new(),
            workers: Vec::new(),
            wan,
            metrics: Vec::new(),
            started: 0.0,
        };
        let mut worker_offset = 0;
        for (d, dc) in spec.datacenters.iter().enumerate() {
            let shards = ports[d]
                .iter()
                .enumerate()
                .map(|(i, &port)| cluster.spawn_parameter_server(job, d, i, port, &topologies[d]))
                .collect::<Result<_, _>>()?;
            let workers = usize::try_from(dc.workers).unwrap_or(0);
            cluster.sites.push(Site {
                name: dc.name.clone(),
                workers,
                worker_offset,
                shards,
            });
            worker_offset += workers;
        }
        cluster.wait_for_parameter_servers().await?;
        cluster.started = unix_now();
        for (d, dc) in spec.datacenters.iter().enumerate() {
            for index in 0..dc.workers.max(0) {
                let args = vec![
                    "worker".to_owned(),
                    format!("--index={index}"),
                    format!("--topology={}", topologies[d].display()),
                    format!("--eval-every={}", cluster.processes.options.eval_every),
                ];
                let name = format!("{}-worker-{index}", dc.name);
                cluster
                    .workers
                    .push(cluster.processes.spawn(&name, args, true)?);
            }
        }
        Ok(cluster)
    }

    /// Starts shard `shard` of datacenter `dc` on `port`; returns its index
    /// in `self.shards`.
    fn spawn_parameter_server(
        &mut self,
        job: &ResolvedJob<'_>,
        dc: usize,
        shard: usize,
        port: u16,
        topology: &Path,
    ) -> Result<usize, RunError> {
        let name = format!("{}-ps-{shard}", job.job.spec.datacenters[dc].name);
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut args = vec![
            "ps".to_owned(),
            format!("--shard={shard}"),
            format!("--listen=127.0.0.1:{port}"),
            format!("--metrics-listen={metrics}"),
            format!("--topology={}", topology.display()),
            // Statuses and snapshots are read after training; `shutdown`
            // stops the shards.
            "--keep-serving".to_owned(),
        ];
        if job.job.spec.checkpoint.is_some() {
            let dir = self.processes.options.work_dir.join(&name);
            args.push(format!("--checkpoint-dir={}", dir.display()));
        }
        self.metrics.push(metrics);
        self.shards.push(self.processes.spawn(&name, args, true)?);
        self.ps_addresses.push(format!("http://127.0.0.1:{port}"));
        Ok(self.shards.len() - 1)
    }

    async fn wait_for_parameter_servers(&mut self) -> Result<(), RunError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        for shard in 0..self.ps_addresses.len() {
            loop {
                if self.status(shard).await.is_ok() {
                    break;
                }
                let role = &mut self.shards[shard];
                if let Some(status) = role
                    .child
                    .try_wait()
                    .map_err(io("watching a parameter server"))?
                {
                    return Err(self.processes.failed(role, status));
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

    /// Addresses of every parameter server: each datacenter's shards in
    /// order, datacenters in the job's order.
    #[must_use]
    pub fn parameter_server_addresses(&self) -> &[String] {
        &self.ps_addresses
    }

    /// Every Prometheus endpoint of the run (`http://ADDR/metrics`): the
    /// parameter servers' and the WAN proxy's.
    #[must_use]
    pub fn metrics_endpoints(&self) -> Vec<SocketAddr> {
        let mut endpoints = self.metrics.clone();
        endpoints.extend(self.wan.as_ref().map(|w| w.metrics));
        endpoints
    }

    /// The status of parameter server `shard` (an index into
    /// [`Self::parameter_server_addresses`]).
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
        let role = &mut self.shards[shard];
        role.child
            .kill()
            .await
            .map_err(io(format!("killing {}", role.name)))
    }

    /// Starts parameter server `shard` again with the same arguments; it
    /// restores from its checkpoint and write-ahead log.
    pub async fn restart_parameter_server(&mut self, shard: usize) -> Result<(), RunError> {
        let (name, args) = (
            self.shards[shard].name.clone(),
            self.shards[shard].args.clone(),
        );
        self.shards[shard] = self.processes.spawn(&name, args, true)?;
        self.wait_for_parameter_servers().await
    }

    /// The clock of site `site`'s slowest worker and its model's last metric.
    async fn site_progress(&self, site: &Site) -> Option<(u64, Option<f64>)> {
        let status = self.status(*site.shards.first()?).await.ok()?;
        let (status, clock) = if self.global {
            let global = self.status(0).await.ok()?;
            let clocks = global
                .worker_clocks
                .get(site.worker_offset..site.worker_offset + site.workers)?;
            let clock = clocks.iter().copied().min().unwrap_or(0);
            (global, clock)
        } else {
            let clock = status.min_clock;
            (status, clock)
        };
        Some((clock, status.metrics.last().map(|m| m.metric)))
    }

    /// Waits until every worker has exited, drawing a progress bar per
    /// datacenter; then, with mirrors, until every update reached them.
    pub async fn wait(&mut self, max_clocks: Option<u64>) -> Result<(), RunError> {
        let bars = MultiProgress::with_draw_target(if self.processes.options.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let style = ProgressStyle::with_template(
            "{prefix:>14} [{elapsed_precise}] {bar:30} clock {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let site_bars: Vec<ProgressBar> = self
            .sites
            .iter()
            .map(|site| {
                let bar =
                    bars.add(max_clocks.map_or_else(ProgressBar::new_spinner, ProgressBar::new));
                bar.set_style(style.clone());
                bar.set_prefix(site.name.clone());
                bar
            })
            .collect();
        let mut exited = vec![false; self.workers.len()];
        while exited.iter().any(|e| !e) {
            for (index, worker) in self.workers.iter_mut().enumerate() {
                if exited[index] {
                    continue;
                }
                if let Some(status) = worker.child.try_wait().map_err(io("watching a worker"))? {
                    if !status.success() {
                        let _ = bars.clear();
                        return Err(self.processes.failed(worker, status));
                    }
                    exited[index] = true;
                }
            }
            for (site, bar) in self.sites.iter().zip(&site_bars) {
                if let Some((clock, metric)) = self.site_progress(site).await {
                    bar.set_position(clock);
                    if let Some(metric) = metric {
                        bar.set_message(format!("metric {metric:.4}"));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for bar in &site_bars {
            bar.finish();
        }
        if self.mirrored {
            self.wait_for_mirrors().await?;
        }
        Ok(())
    }

    /// Waits until every shard has delivered all its updates to its mirrors.
    async fn wait_for_mirrors(&self) -> Result<(), RunError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        for shard in 0..self.shards.len() {
            loop {
                let status = self.status(shard).await?;
                if status.mirror.is_none_or(|m| m.drained) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(RunError::Unreachable {
                        shard,
                        message: "did not deliver its updates to its mirrors within 120 s"
                            .to_owned(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Stops the parameter servers gracefully (SIGTERM: they write a final
    /// checkpoint) and the WAN proxy; returns the status of every shard and
    /// the bytes per WAN link, taken just before.
    pub async fn shutdown(mut self) -> Result<(Vec<pb::StatusResponse>, Vec<LinkBytes>), RunError> {
        let mut statuses = Vec::new();
        for shard in 0..self.ps_addresses.len() {
            statuses.push(self.status(shard).await?);
        }
        for role in &mut self.shards {
            self.processes.stop(role).await?;
        }
        let mut links = Vec::new();
        if let Some(mut wan) = self.wan.take() {
            links = wan.link_bytes().await?;
            self.processes.stop(&mut wan.role).await?;
        }
        Ok((statuses, links))
    }
}

/// Ships every datacenter's training examples to the first datacenter over
/// the emulated WAN, and the trained model back: the `centralized` mode's
/// cost of moving things, measured on real links.
struct Shipment {
    wan: Wan,
    /// Route addresses from each datacenter to the first, and back.
    inbound: Vec<SocketAddr>,
    outbound: Vec<SocketAddr>,
    sink: tokio::task::JoinHandle<()>,
}

impl Shipment {
    async fn start(processes: &Processes, job: &ResolvedJob<'_>) -> Result<Self, RunError> {
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("listening for shipped data"))?;
        let target = sink
            .local_addr()
            .map_err(io("listening for shipped data"))?;
        // Reads every connection to its end: the bytes have arrived.
        let sink = tokio::spawn(async move {
            while let Ok((mut stream, _)) = sink.accept().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                    let _ = stream.write_all(b"k").await;
                });
            }
        });
        let names: Vec<String> = job.datacenters.iter().map(|d| d.name_any()).collect();
        let mut routes = Vec::new();
        let (mut inbound, mut outbound) = (Vec::new(), Vec::new());
        for name in names.iter().skip(1) {
            for (from, to, list) in [
                (name, &names[0], &mut inbound),
                (&names[0], name, &mut outbound),
            ] {
                let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                routes.push(Route {
                    from: from.clone(),
                    to: to.clone(),
                    listen,
                    target,
                });
                list.push(listen);
            }
        }
        let wan = Wan::start(processes, job, routes).await?;
        Ok(Self {
            wan,
            inbound,
            outbound,
            sink,
        })
    }

    /// Sends `payloads[i]` through `routes[i]`, all at once; returns when
    /// every byte has arrived.
    async fn send(routes: &[SocketAddr], payloads: Vec<Vec<u8>>) -> Result<(), RunError> {
        let sends = routes
            .iter()
            .zip(payloads)
            .map(|(&route, payload)| async move {
                let mut stream = tokio::net::TcpStream::connect(route).await?;
                stream.write_all(&payload).await?;
                stream.shutdown().await?;
                let mut ack = [0; 1];
                stream.read_exact(&mut ack).await?;
                Ok::<_, std::io::Error>(())
            });
        futures::future::try_join_all(sends)
            .await
            .map_err(io("shipping over the WAN"))?;
        Ok(())
    }

    /// Ships the training examples of every datacenter but the first (the
    /// partitions its workers would train on) to the first.
    async fn ship_data(&self, job: &ResolvedJob<'_>, train: &Examples) -> Result<(), RunError> {
        let spec = &job.job.spec;
        // The same partitions the workers draw with their default seed.
        let parts = crate::data::partition(
            train,
            spec.datacenters.iter().map(|d| count(d.workers)).sum(),
            &spec.dataset.partitioning,
            42,
        );
        let mut payloads = Vec::new();
        let mut offset = count(spec.datacenters[0].workers);
        for dc in spec.datacenters.iter().skip(1) {
            let indices: Vec<usize> = parts[offset..offset + count(dc.workers)].concat();
            payloads.push(example_bytes(&train.select(&indices)));
            offset += count(dc.workers);
        }
        Self::send(&self.inbound, payloads).await
    }

    async fn finish(mut self, processes: &Processes) -> Result<Vec<LinkBytes>, RunError> {
        let links = self.wan.link_bytes().await?;
        processes.stop(&mut self.wan.role).await?;
        self.sink.abort();
        Ok(links)
    }
}

/// Examples as bytes, the way they would be shipped: features as
/// little-endian f32 and a u16 label, or (user u32, item u32, rating f32).
fn example_bytes(examples: &Examples) -> Vec<u8> {
    let mut out = Vec::new();
    match examples {
        Examples::Classification(c) => {
            for (row, label) in c.features.rows().into_iter().zip(&c.labels) {
                for x in row {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                out.extend_from_slice(&label.to_le_bytes());
            }
        }
        Examples::Ratings(r) => {
            for ((u, i), x) in r.users.iter().zip(&r.items).zip(&r.ratings) {
                out.extend_from_slice(&u.to_le_bytes());
                out.extend_from_slice(&i.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    out
}

/// Runs the manifest's job to completion and returns its report.
pub async fn run(options: RunOptions) -> Result<Report, RunError> {
    let started = Instant::now();
    let target_override = options.target;
    let manifest = Manifest::load(&options.manifest)?;
    let job = manifest.job()?;
    if let Some(mode) = crate::cartel::Mode::of_job(&job) {
        return crate::cartel::run_job(&options, mode).await;
    }
    let spec = &job.job.spec;
    // Loading here fetches the data set once, before the roles start and
    // load it from the cache, and tells the metric's name and direction.
    let data = crate::data::load(spec.dataset.name, &options.data_dir)
        .map_err(|e| RunError::Unsupported(e.to_string()))?;
    let model = crate::model::build(&spec.model, &data)
        .map_err(|e| RunError::Unsupported(e.to_string()))?;
    let max_clocks = spec.stopping.max_clocks.and_then(|c| u64::try_from(c).ok());
    let centralized = job.sync_policy.spec.inter_datacenter.model
        == InterDatacenterModel::Centralized
        && spec.datacenters.len() > 1;
    std::fs::create_dir_all(options.work_dir.join("logs"))
        .map_err(io("creating the work directory"))?;
    let processes = Processes {
        options: options.clone(),
    };

    let mut shipment = None;
    let shipping_started = unix_now();
    if centralized {
        let s = Shipment::start(&processes, &job).await?;
        s.ship_data(&job, &data.train).await?;
        shipment = Some(s);
    }
    let shipping_seconds = centralized.then(|| unix_now() - shipping_started);

    let mut cluster = LocalCluster::start(options, &job).await?;
    if centralized {
        cluster.started = shipping_started;
    }
    cluster.wait(max_clocks).await?;
    let mut model_bytes = Vec::new();
    if let Some(s) = &shipment {
        // The trained model, as the parameter servers hold it, goes back.
        for shard in 0..cluster.ps_addresses.len() {
            model_bytes.extend(pull_all(&cluster, shard).await?);
        }
        Shipment::send(&s.outbound, vec![model_bytes.clone(); s.outbound.len()]).await?;
    }
    let parameter_servers = cluster.ps_addresses.len();
    let workers = cluster.workers.len();
    let training_started = cluster.started;
    let sites: Vec<(String, Vec<usize>, usize, usize)> = cluster
        .sites
        .iter()
        .map(|s| (s.name.clone(), s.shards.clone(), s.worker_offset, s.workers))
        .collect();
    let global = cluster.global;
    let (statuses, mut links) = cluster.shutdown().await?;
    if let Some(s) = shipment {
        links.extend(s.finish(&processes).await?);
    }
    let target = spec.stopping.target_metric.or(target_override);
    let higher = model.higher_is_better();
    let met = |m: f64| target.is_some_and(|t| if higher { m >= t } else { m <= t });
    let per_datacenter = datacenter_reports(&sites, &statuses, global, training_started, met);
    let finals: Vec<f64> = per_datacenter
        .iter()
        .filter_map(|d| d.final_metric)
        .collect();
    #[allow(clippy::cast_precision_loss)] // a handful of datacenters
    Ok(Report {
        job: job.job.name_any(),
        mode: mode_name(job.sync_policy.spec.inter_datacenter.model).to_owned(),
        metric_name: model.metric_name().to_owned(),
        final_metric: (!finals.is_empty())
            .then(|| finals.iter().sum::<f64>() / finals.len() as f64),
        target_metric: target,
        time_to_target_seconds: per_datacenter
            .iter()
            .map(|d| d.time_to_target_seconds)
            .collect::<Option<Vec<f64>>>()
            .and_then(|t| t.into_iter().reduce(f64::max)),
        wall_seconds: started.elapsed().as_secs_f64(),
        clocks: per_datacenter.iter().map(|d| d.clocks).min().unwrap_or(0),
        stop_reason: statuses
            .first()
            .map(|s| s.stop_reason.clone())
            .unwrap_or_default(),
        lan_bytes_total: statuses
            .iter()
            .map(|s| s.bytes_received + s.bytes_sent)
            .sum(),
        wan_bytes_total: links.iter().map(|l| l.bytes).sum(),
        wan_links: links,
        mirrors: MirrorTotals::of(&statuses),
        shipping_seconds,
        parameter_servers,
        workers,
        metric_history: per_datacenter
            .first()
            .map(|d| d.metric_history.clone())
            .unwrap_or_default(),
        per_datacenter,
        collaborative: crate::cartel::CollaborativeTotals::default(),
    })
}

/// How each site's model fared, from the final status of every shard.
fn datacenter_reports(
    sites: &[(String, Vec<usize>, usize, usize)],
    statuses: &[pb::StatusResponse],
    global: bool,
    training_started: f64,
    met: impl Fn(f64) -> bool,
) -> Vec<DatacenterReport> {
    sites
        .iter()
        .map(|(name, shards, offset, workers)| {
            // In the global modes one model, evaluated through shard 0.
            let evaluated = if global {
                &statuses[0]
            } else {
                &statuses[shards[0]]
            };
            let clocks = if global {
                evaluated
                    .worker_clocks
                    .get(*offset..offset + workers)
                    .and_then(|c| c.iter().copied().min())
                    .unwrap_or(0)
            } else {
                evaluated.min_clock
            };
            let metric_history: Vec<MetricSample> = evaluated
                .metrics
                .iter()
                .map(|p| MetricSample {
                    seconds: p.unix_seconds - training_started,
                    clock: p.clock,
                    metric: p.metric,
                })
                .collect();
            DatacenterReport {
                name: name.clone(),
                clocks,
                final_metric: metric_history.last().map(|s| s.metric),
                time_to_target_seconds: metric_history
                    .iter()
                    .find(|s| met(s.metric))
                    .map(|s| s.seconds),
                metric_history,
            }
        })
        .collect()
}

fn count(n: i32) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Every value parameter server `shard` holds, as packed bytes.
async fn pull_all(cluster: &LocalCluster, shard: usize) -> Result<Vec<u8>, RunError> {
    let unreachable = |message: String| RunError::Unreachable { shard, message };
    let mut client = connect(&cluster.ps_addresses[shard..=shard])
        .map_err(|e| unreachable(e.to_string()))?
        .remove(0);
    // Training has stopped, so any clock may read.
    let response = client
        .pull(pb::PullRequest {
            worker: 0,
            clock: u64::MAX,
            rows: Some(pb::Rows {
                keys: Vec::new(),
                values: Vec::new(),
                all: true,
            }),
        })
        .await
        .map_err(|e| unreachable(e.message().to_owned()))?;
    Ok(response.into_inner().rows.unwrap_or_default().values)
}
