//! `geoml run`: a manifest's TrainingJob on this machine, as real `geoml ps`
//! and `geoml worker` processes talking gRPC over loopback, each datacenter's
//! traffic to the others through a `geoml wan-proxy` that emulates the WAN.
//!
//! - [`cluster`]: [`LocalRun`], the processes of one job.
//! - [`topology`]: the topology files and WAN routes that wire them.
//! - [`wan_proxy`]: the `geoml wan-proxy` process and its byte counts.
//! - [`shipment`]: the `centralized` mode's data and model shipping.
//!
//! Collaborative jobs go to [`crate::cartel`].

pub mod cluster;
mod shipment;
mod topology;
mod wan_proxy;

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use geoml_crds::datacenter::link_bandwidth_mbps;
use geoml_crds::identity::Identity;
use geoml_crds::manifest::{Manifest, ResolvedJob};
use geoml_crds::mode::{CollaborativeMode, Mode};
use geoml_crds::roles::JobRoleArgs;
use geoml_crds::sync_policy::{InterDatacenterModel, ThresholdSchedule};
use geoml_dataplane::data::Examples;
use geoml_dataplane::model::Model;
use geoml_dataplane::worker::{connect, final_model};
use geoml_proto as pb;
use kube::ResourceExt;
use serde::Serialize;

pub use self::cluster::LocalRun;
use self::shipment::Shipment;
use crate::error::{RunError, io};
pub use crate::options::RunOptions;
use crate::process::{Process, Supervisor, unused_port};
pub use crate::report::{
    CollaborativeTotals, DatacenterReport, LinkBytes, MetricSample, MirrorTotals, Report, bytes_at,
    human_bytes, settled_rates,
};

/// Seconds since the Unix epoch.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn free_port() -> Result<u16, RunError> {
    Ok(unused_port()?)
}

fn write_yaml(path: &Path, value: &impl Serialize) -> Result<(), RunError> {
    let text = geoml_crds::yaml::to_string(value)?;
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

/// Starts the roles of a local run: job roles get the manifest and the data
/// directory.
struct Processes {
    options: RunOptions,
    supervisor: Supervisor,
}

impl Processes {
    fn new(options: RunOptions) -> Result<Self, RunError> {
        let supervisor = Supervisor::new(
            &options.geoml,
            &options.work_dir,
            options.insecure_plaintext,
        )?;
        Ok(Self {
            options,
            supervisor,
        })
    }

    /// The arguments of job role process `name`, which is `identity`,
    /// with `topology`.
    fn job_role(
        &self,
        topology: &Path,
        name: &str,
        identity: &Identity,
    ) -> Result<JobRoleArgs, RunError> {
        let mut role = JobRoleArgs::new(self.options.manifest.clone(), topology.to_owned());
        role.data.data_dir = Some(self.options.data_dir.clone());
        role.seed = self.options.seed;
        role.tls = self.supervisor.tls(name, identity)?;
        Ok(role)
    }

    /// Starts `geoml ARGS` as role `name`.
    fn spawn(&self, name: &str, args: Vec<String>) -> Result<Process, RunError> {
        Ok(self.supervisor.spawn(name, args)?)
    }

    #[allow(clippy::unused_self)] // kept beside `spawn` and `stop`
    fn failed(&self, role: &Process, status: std::process::ExitStatus) -> RunError {
        role.failed(status).into()
    }

    #[allow(clippy::unused_self)] // kept beside `spawn` and `failed`
    async fn stop(&self, role: &mut Process) -> Result<(), RunError> {
        Ok(role.stop().await?)
    }
}

/// Runs the manifest's job to completion and returns its report.
pub async fn run(options: RunOptions) -> Result<Report, RunError> {
    let started = Instant::now();
    let target_override = options.target;
    let manifest = Manifest::load(&options.manifest)?;
    let job = manifest.job()?;
    if let Some(mode) = CollaborativeMode::of_job(&job) {
        return crate::cartel::run(&options, mode).await;
    }
    let spec = &job.job.spec;
    // Loading here fetches the data set once, before the roles start and
    // load it from the cache, and tells the metric's name and direction.
    let data = geoml_dataplane::data::load(spec.dataset.name, &options.data_dir)?;
    let model = geoml_dataplane::model::build(&spec.model, &data)?;
    let max_clocks = spec.stopping.max_clocks.and_then(|c| u64::try_from(c).ok());
    let centralized = job.sync_policy.spec.inter_datacenter.model
        == InterDatacenterModel::Centralized
        && spec.datacenters.len() > 1;
    let processes = Processes::new(options.clone())?;
    let cpu_before = children_cpu_seconds();

    let mut shipment = None;
    let shipping_started = unix_now();
    if centralized {
        let s = Shipment::start(&processes, &job).await?;
        s.ship_data(&job, &data.train, options.seed).await?;
        shipment = Some(s);
    }
    let shipping_seconds = centralized.then(|| unix_now() - shipping_started);

    let mut cluster = LocalRun::start(options, &job).await?;
    if centralized {
        cluster.started = shipping_started;
    }
    cluster.wait(max_clocks).await?;
    let finals = final_metrics(&cluster, model.as_ref(), &data.test).await?;
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
    let link_samples = std::mem::take(&mut cluster.link_samples);
    let wan_link_rates = settled_rates(
        &link_samples[..cluster.samples_while_all_trained],
        |from, to| link_budget(&job, from, to),
    );
    let (statuses, mut links) = cluster.shutdown().await?;
    if let Some(s) = shipment {
        links.extend(s.finish(&processes).await?);
    }
    let target = spec.stopping.target_metric.or(target_override);
    let higher = model.higher_is_better();
    let met = |m: f64| target.is_some_and(|t| if higher { m >= t } else { m <= t });
    let per_datacenter =
        datacenter_reports(&sites, &statuses, &finals, global, training_started, met);
    let time_to_target_seconds = DatacenterReport::all_at_target(&per_datacenter);
    Ok(Report {
        job: job.job.name_any(),
        mode: Mode::from(job.sync_policy.spec.inter_datacenter.model)
            .name()
            .to_owned(),
        metric_name: model.metric_name().to_owned(),
        final_metric: DatacenterReport::mean_final(&per_datacenter),
        target_metric: target,
        time_to_target_seconds,
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
        wan_bytes_to_target: time_to_target_seconds.map(|t| bytes_at(&link_samples, t, &links)),
        cpu_seconds: Some(children_cpu_seconds() - cpu_before),
        wan_links: links,
        wan_link_rates,
        mirrors: MirrorTotals::of(&statuses),
        shipping_seconds,
        parameter_servers,
        workers,
        metric_history: per_datacenter
            .first()
            .map(|d| d.metric_history.clone())
            .unwrap_or_default(),
        per_datacenter,
        collaborative: CollaborativeTotals::default(),
    })
}

/// CPU seconds (user and system) of this process's children that have
/// exited and been waited for.
fn children_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| {
        let seconds = |t: nix::sys::time::TimeVal| {
            #[allow(clippy::cast_precision_loss)] // seconds of a run
            let s = t.tv_sec() as f64;
            s + f64::from(i32::try_from(t.tv_usec()).unwrap_or(0)) * 1e-6
        };
        seconds(u.user_time()) + seconds(u.system_time())
    })
}

/// The budget of the WAN link from datacenter `from` to `to`, in bytes per
/// second, when `job` steers its thresholds toward one.
fn link_budget(job: &ResolvedJob<'_>, from: &str, to: &str) -> Option<f64> {
    let policy = &job.sync_policy.spec;
    if policy.significance.schedule != ThresholdSchedule::BandwidthBudget {
        return None;
    }
    let bandwidth = |name: &str| {
        job.datacenters
            .iter()
            .find(|d| d.name_any() == name)
            .and_then(|d| d.spec.wan.as_ref())
            .map(|w| w.bandwidth_mbps)
    };
    policy
        .wan_budget()
        .of_link(link_bandwidth_mbps(bandwidth(from), bandwidth(to)))
        .map(|mbps| mbps * 1e6 / 8.0)
}

/// How each site's model fared, from the final status of every shard.
fn datacenter_reports(
    sites: &[(String, Vec<usize>, usize, usize)],
    statuses: &[pb::StatusResponse],
    finals: &[f64],
    global: bool,
    training_started: f64,
    met: impl Fn(f64) -> bool,
) -> Vec<DatacenterReport> {
    sites
        .iter()
        .zip(finals)
        .map(|((name, shards, offset, workers), &final_metric)| {
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
                final_metric: Some(final_metric),
                time_to_target_seconds: metric_history
                    .iter()
                    .find(|s| met(s.metric))
                    .map(|s| s.seconds),
                metric_history,
            }
        })
        .collect()
}

/// Each site's final model (in the global modes, the one model) as its
/// parameter servers hold it once training stopped and, with mirrors, every
/// update arrived, evaluated on the held-out data.
async fn final_metrics(
    cluster: &LocalRun,
    model: &dyn Model,
    test: &Examples,
) -> Result<Vec<f64>, RunError> {
    let evaluate = async |shards: &[usize]| -> Result<f64, RunError> {
        let addresses: Vec<String> = shards
            .iter()
            .map(|&s| cluster.ps_addresses[s].clone())
            .collect();
        let params = final_model(&addresses, cluster.transport(), model).await?;
        Ok(model.evaluate(&params, test))
    };
    if cluster.global {
        let all: Vec<usize> = (0..cluster.ps_addresses.len()).collect();
        return Ok(vec![evaluate(&all).await?; cluster.sites.len()]);
    }
    let mut finals = Vec::new();
    for site in &cluster.sites {
        finals.push(evaluate(&site.shards).await?);
    }
    Ok(finals)
}

/// Every value parameter server `shard` holds, as packed bytes.
async fn pull_all(cluster: &LocalRun, shard: usize) -> Result<Vec<u8>, RunError> {
    let unreachable = |message: String| RunError::Unreachable { shard, message };
    let mut client = connect(&cluster.ps_addresses[shard..=shard], cluster.transport())
        .map_err(|e| unreachable(e.to_string()))?
        .remove(0);
    // Training has stopped, so any clock may read.
    let response = client
        .pull(pb::PullRequest {
            worker: 0,
            clock: u64::MAX,
            rows: Some(pb::Rows {
                all: true,
                ..pb::Rows::default()
            }),
        })
        .await
        .map_err(|e| unreachable(e.message().to_owned()))?;
    Ok(response.into_inner().rows.unwrap_or_default().values.into())
}
