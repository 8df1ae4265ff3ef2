//! The emulated WAN of a local run: a `geoml wan-proxy` process for the
//! job's datacenters and the routes between them, its byte counts, its
//! fault API and the faults `geoml run --fault` schedules.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use geoml_crds::manifest::ResolvedJob;
use geoml_crds::roles::WanProxyArgs;
use kube::ResourceExt;

use super::{Processes, free_port, write_yaml};
use crate::error::{RunError, io};
use crate::process::Process;
use crate::report::LinkBytes;
use crate::wan::fault::{self, ScheduledFault};
use crate::wan::{Route, WanConfig, control};

/// How long the proxy may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The emulated WAN: a `geoml wan-proxy` process.
pub(super) struct Wan {
    pub(super) role: Process,
    pub(super) metrics: SocketAddr,
    /// Its fault API.
    pub(super) control: SocketAddr,
    /// Applies the scheduled faults.
    schedule: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Wan {
    fn drop(&mut self) {
        if let Some(schedule) = self.schedule.take() {
            schedule.abort();
        }
    }
}

impl Wan {
    /// Starts a proxy for `routes` between the job's datacenters, waits
    /// until it listens, then applies `faults` on their schedule.
    pub(super) async fn start(
        processes: &Processes,
        job: &ResolvedJob<'_>,
        routes: Vec<Route>,
        faults: &[ScheduledFault],
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
        // Refuse a fault on a datacenter or link the WAN lacks before
        // anything starts.
        let links: Vec<(String, String)> = config
            .links
            .iter()
            .map(|l| (l.from.clone(), l.to.clone()))
            .collect();
        for f in faults {
            fault::resolve(f.op.scope(), &links)?;
        }
        let path = processes.options.work_dir.join("wan.yaml");
        write_yaml(&path, &config)?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let control = match processes.options.wan_control {
            Some(control) if !control.ip().is_loopback() => {
                return Err(fault::FaultError::NotLoopback(control).into());
            }
            Some(control) => control,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        let mut role = processes.spawn(
            "wan-proxy",
            WanProxyArgs {
                config: path,
                metrics_listen: Some(metrics),
                control_listen: Some(control),
            }
            .command_line(),
        )?;
        let deadline = Instant::now() + START_TIMEOUT;
        while control::status(control).await.is_err()
            || tokio::net::TcpStream::connect(metrics).await.is_err()
        {
            if let Some(status) = role.child.try_wait().map_err(io("watching wan-proxy"))? {
                return Err(processes.failed(&role, status));
            }
            if Instant::now() > deadline {
                return Err(RunError::Timeout {
                    what: "wan-proxy".to_owned(),
                    happen: "start",
                    after: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let progress = processes.options.progress;
        if progress {
            eprintln!(
                "WAN fault API: http://{control}{} (geoml wan-fault --control {control} status)",
                control::PATH
            );
        }
        let schedule = (!faults.is_empty())
            .then(|| tokio::spawn(apply_on_schedule(control, faults.to_vec(), progress)));
        Ok(Self {
            role,
            metrics,
            control,
            schedule,
        })
    }

    /// Bytes per link so far.
    pub(super) async fn link_bytes(&self) -> Result<Vec<LinkBytes>, RunError> {
        let text = geoml_dataplane::metrics::scrape(self.metrics)
            .await
            .map_err(io("scraping wan-proxy"))?;
        Ok(crate::wan::link_bytes(&text)
            .into_iter()
            .map(|(from, to, bytes)| LinkBytes { from, to, bytes })
            .collect())
    }
}

/// Applies `faults` through the proxy's fault API at `control`, timed from
/// now; says so on stderr when `progress` (a failure is logged, and the run
/// goes on).
async fn apply_on_schedule(control: SocketAddr, faults: Vec<ScheduledFault>, progress: bool) {
    let start = tokio::time::Instant::now();
    for (at, op) in ScheduledFault::timeline(&faults) {
        tokio::time::sleep_until(start + at).await;
        match control::apply(control, &op).await {
            Ok(_) if progress => eprintln!("WAN fault at {} s: {op}", at.as_secs_f64()),
            Ok(_) => tracing::info!("WAN fault at {} s: {op}", at.as_secs_f64()),
            Err(e) => tracing::error!("WAN fault {op}: {e}"),
        }
    }
}
