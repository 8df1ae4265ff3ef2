//! The emulated WAN of a local run: a `geoml wan-proxy` process for the
//! job's datacenters and the routes between them, and its byte counts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use geoml_crds::manifest::ResolvedJob;
use geoml_crds::roles::WanProxyArgs;
use kube::ResourceExt;

use super::{Processes, free_port, write_yaml};
use crate::error::{RunError, io};
use crate::process::Process;
use crate::report::LinkBytes;
use crate::wan::{Route, WanConfig};

/// How long the proxy may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The emulated WAN: a `geoml wan-proxy` process.
pub(super) struct Wan {
    pub(super) role: Process,
    pub(super) metrics: SocketAddr,
}

impl Wan {
    /// Starts a proxy for `routes` between the job's datacenters and waits
    /// until it listens.
    pub(super) async fn start(
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
            WanProxyArgs {
                config: path,
                metrics_listen: Some(metrics),
            }
            .command_line(),
        )?;
        let deadline = Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(metrics).await.is_err() {
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
        Ok(Self { role, metrics })
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
