//! [`LocalRun`]: the processes of a job with parameter servers on this
//! machine — its shards, workers and (between datacenters) the WAN proxy —
//! started in order, watched, and stopped.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use geoml_crds::identity::{Identity, Role};
use geoml_crds::manifest::ResolvedJob;
use geoml_crds::roles::{ParameterServerArgs, WorkerArgs};
use geoml_crds::sync_policy::InterDatacenterModel;
use geoml_dataplane::tls::Transport;
use geoml_dataplane::worker::connect;
use geoml_proto as pb;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::topology::wire;
use super::wan_proxy::Wan;
use super::{Processes, free_port, unix_now, write_yaml};
use crate::error::{RunError, io};
use crate::options::RunOptions;
use crate::process::Process;
use crate::report::LinkBytes;

/// A datacenter of a local run.
pub(super) struct LocalDatacenter {
    pub(super) name: String,
    pub(super) workers: usize,
    pub(super) worker_offset: usize,
    /// Indexes into `LocalRun::shards` of its own shards.
    pub(super) shards: Vec<usize>,
}

/// The processes of a job running on this machine.
pub struct LocalRun {
    processes: Processes,
    pub(super) global: bool,
    mirrored: bool,
    pub(super) sites: Vec<LocalDatacenter>,
    shards: Vec<Process>,
    pub(super) ps_addresses: Vec<String>,
    pub(super) workers: Vec<Process>,
    wan: Option<Wan>,
    /// Prometheus endpoints of the parameter servers.
    metrics: Vec<SocketAddr>,
    /// When the workers started (Unix seconds).
    pub(super) started: f64,
    /// Bytes per WAN link while a worker ran, with the seconds since
    /// [`Self::started`], oldest first.
    pub(super) link_samples: Vec<(f64, Vec<LinkBytes>)>,
    /// How many of them were taken while every worker ran.
    pub(super) samples_while_all_trained: usize,
}

impl LocalRun {
    /// Starts the job's parameter servers (and, between datacenters, the
    /// WAN proxy), waits until every shard answers, then starts the workers.
    pub async fn start(options: RunOptions, job: &ResolvedJob<'_>) -> Result<Self, RunError> {
        let spec = &job.job.spec;
        let model = job.sync_policy.spec.inter_datacenter.model;
        if model == InterDatacenterModel::Collaborative {
            return Err(RunError::Unsupported(
                "mode cartel has no parameter servers",
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
        let processes = Processes::new(options)?;

        let names: Vec<String> = spec.datacenters.iter().map(|d| d.name.clone()).collect();
        let mut ports: Vec<Vec<u16>> = Vec::new();
        for dc in &job.plan.datacenters {
            ports.push(
                (0..dc.shards)
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
        let faults = processes.options.faults.clone();
        let wan = if routes.is_empty() {
            if !faults.is_empty() {
                return Err(RunError::Unsupported(
                    "--fault needs a WAN between datacenters: this job's mode or its single datacenter has none",
                ));
            }
            None
        } else {
            Some(Wan::start(&processes, job, routes, &faults).await?)
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
            link_samples: Vec::new(),
            samples_while_all_trained: 0,
        };
        let mut worker_offset = 0;
        for (d, dc) in job.plan.datacenters.iter().enumerate() {
            let shards = ports[d]
                .iter()
                .enumerate()
                .map(|(i, &port)| cluster.spawn_parameter_server(job, d, i, port, &topologies[d]))
                .collect::<Result<_, _>>()?;
            let workers = dc.workers;
            cluster.sites.push(LocalDatacenter {
                name: dc.name.clone(),
                workers,
                worker_offset,
                shards,
            });
            worker_offset += workers;
        }
        cluster.wait_for_parameter_servers().await?;
        cluster.started = unix_now();
        for (d, dc) in job.plan.datacenters.iter().enumerate() {
            for index in 0..dc.workers {
                let name = format!("{}-worker-{index}", dc.name);
                let identity = Identity::new(dc.name.clone(), Role::Worker);
                let args = WorkerArgs {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    eval_every: cluster.processes.options.eval_every,
                    role: cluster
                        .processes
                        .job_role(&topologies[d], &name, &identity)?,
                }
                .command_line();
                cluster.workers.push(cluster.processes.spawn(&name, args)?);
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
        let datacenter = &job.job.spec.datacenters[dc].name;
        let name = format!("{datacenter}-ps-{shard}");
        let identity = Identity::new(datacenter.clone(), Role::ParameterServer);
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut args = ParameterServerArgs::new(
            u32::try_from(shard).unwrap_or(u32::MAX),
            SocketAddr::from(([127, 0, 0, 1], port)),
            self.processes.job_role(topology, &name, &identity)?,
        );
        args.role.metrics_listen = Some(metrics);
        // Statuses and snapshots are read after training; `shutdown`
        // stops the shards.
        args.keep_serving = true;
        if job.job.spec.checkpoint.is_some() {
            args.checkpoint_dir = Some(self.processes.options.work_dir.join(&name));
        }
        self.metrics.push(metrics);
        self.shards
            .push(self.processes.spawn(&name, args.command_line())?);
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

    /// How the launcher calls the roles of this run: with its own
    /// certificate of the run's CA, or in plaintext (see
    /// [`RunOptions::insecure_plaintext`]).
    #[must_use]
    pub fn transport(&self) -> &Transport {
        self.processes.supervisor.transport()
    }

    /// The WAN proxy's fault API (`http://ADDR/faults`), if the run has a
    /// WAN; see [`crate::wan::control`].
    #[must_use]
    pub fn wan_control(&self) -> Option<SocketAddr> {
        self.wan.as_ref().map(|w| w.control)
    }

    /// Every Prometheus endpoint of the run (`http://ADDR/metrics`): the
    /// parameter servers' and the WAN proxy's.
    #[must_use]
    pub fn metrics_endpoints(&self) -> Vec<SocketAddr> {
        let mut endpoints = self.metrics.clone();
        endpoints.extend(self.wan.as_ref().map(|w| w.metrics));
        endpoints
    }

    /// The process id of parameter server `shard`, while it runs.
    #[must_use]
    pub fn parameter_server_pid(&self, shard: usize) -> Option<u32> {
        self.shards[shard].child.id()
    }

    /// The status of parameter server `shard` (an index into
    /// [`Self::parameter_server_addresses`]).
    pub async fn status(&self, shard: usize) -> Result<pb::StatusResponse, RunError> {
        let unreachable = |message: String| RunError::Unreachable { shard, message };
        let mut client = connect(&self.ps_addresses[shard..=shard], self.transport())
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
        Ok(self.shards[shard].kill().await?)
    }

    /// Starts parameter server `shard` again with the same arguments; it
    /// restores from its checkpoint and write-ahead log.
    pub async fn restart_parameter_server(&mut self, shard: usize) -> Result<(), RunError> {
        self.shards[shard] = self.processes.supervisor.respawn(&self.shards[shard])?;
        self.wait_for_parameter_servers().await
    }

    /// The clock of site `site`'s slowest worker and its model's last metric.
    async fn site_progress(&self, site: &LocalDatacenter) -> Option<(u64, Option<f64>)> {
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
            if let Some(wan) = &self.wan
                && let Ok(links) = wan.link_bytes().await
            {
                self.link_samples.push((unix_now() - self.started, links));
                if exited.iter().all(|e| !e) {
                    self.samples_while_all_trained = self.link_samples.len();
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
