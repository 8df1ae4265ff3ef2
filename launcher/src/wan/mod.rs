//! `geoml wan-proxy`: emulated WAN links between datacenters on one machine.
//!
//! A userspace TCP proxy (`tc netem` is not available here). Every route
//! listens on a local address and forwards each connection to a target;
//! bytes from the route's `from` datacenter to its `to` datacenter cross the
//! directed link `from → to`, the replies cross `to → from`. A link delays
//! every byte by its one-way latency and carries at most its bandwidth, which
//! all connections on the link share: a connection reserves the link a chunk
//! at a time, so a small control message waits for at most a chunk or so of
//! other traffic, never for a whole backlog.
//!
//! Faults ([`fault`]) cut, heal, reset or delay links while the proxy runs;
//! [`control`] serves them over HTTP (`geoml wan-proxy --control-listen`)
//! and is their client; [`cli`] is `geoml wan-fault`.

pub mod cli;
pub mod control;
pub mod fault;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

pub use self::fault::{FaultError, FaultOp, FaultState, LinkFault, LinkState, Scope};

/// Bytes a connection reserves the link for at a time.
const CHUNK: usize = 8 << 10;

/// The proxy's configuration file.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WanConfig {
    /// Directed links between datacenters.
    pub links: Vec<Link>,
    /// Listening addresses and where they forward to.
    pub routes: Vec<Route>,
}

/// A directed link: what bytes from `from` to `to` go through.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Link {
    /// Sending datacenter.
    pub from: String,
    /// Receiving datacenter.
    pub to: String,
    /// One-way latency in milliseconds.
    pub latency_ms: f64,
    /// Bandwidth in megabits per second; unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<f64>,
}

/// A forwarded address: connections to `listen`, made from datacenter
/// `from`, reach `target` in datacenter `to`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Datacenter of the connecting side.
    pub from: String,
    /// Datacenter of the target.
    pub to: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address to forward to.
    pub target: SocketAddr,
}

impl WanConfig {
    /// The links between every ordered pair of `datacenters`, each given as
    /// (name, one-way latency to the WAN in ms, bandwidth in Mbit/s): a link
    /// takes half the sum of both ends' latencies (so the round trip is their
    /// sum) and the smaller bandwidth.
    #[must_use]
    pub fn mesh(datacenters: &[(String, f64, Option<f64>)]) -> Vec<Link> {
        let mut links = Vec::new();
        for (a, la, ba) in datacenters {
            for (b, lb, bb) in datacenters {
                if a != b {
                    links.push(Link {
                        from: a.clone(),
                        to: b.clone(),
                        latency_ms: (la + lb) / 2.0,
                        bandwidth_mbps: geoml_crds::datacenter::link_bandwidth_mbps(*ba, *bb),
                    });
                }
            }
        }
        links
    }
}

/// A directed link's shared state.
struct Shaper {
    latency: Duration,
    bytes_per_second: Option<f64>,
    /// When the link finishes sending what was reserved so far.
    free_at: Mutex<Instant>,
    /// Its fault: pumps hold bytes while it is cut.
    fault: watch::Sender<LinkFault>,
    /// Bumped by each reset: every connection crossing the link closes.
    resets: watch::Sender<u64>,
    /// Open connections crossing the link.
    connections: AtomicUsize,
}

impl Shaper {
    fn new(link: &Link) -> Self {
        Self {
            latency: Duration::from_secs_f64(link.latency_ms.max(0.0) / 1e3),
            bytes_per_second: link.bandwidth_mbps.map(|m| m * 1e6 / 8.0),
            free_at: Mutex::new(Instant::now()),
            fault: watch::Sender::new(LinkFault::default()),
            resets: watch::Sender::new(0),
            connections: AtomicUsize::new(0),
        }
    }

    /// Reserves the link for `bytes` once it is free; returns when they
    /// arrive at the other end (latency plus any extra delay).
    async fn reserve(&self, bytes: usize) -> Instant {
        let latency = self.latency + Duration::from_millis(self.fault.borrow().extra_delay_ms);
        let Some(rate) = self.bytes_per_second else {
            return Instant::now() + latency;
        };
        #[allow(clippy::cast_precision_loss)] // chunks are small
        let transmit = Duration::from_secs_f64(bytes as f64 / rate);
        loop {
            let wait = {
                let mut free_at = self
                    .free_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                if *free_at <= now {
                    *free_at = now + transmit;
                    return *free_at + latency;
                }
                *free_at - now
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Waits until the link `fault` watches is not cut; false if it is gone.
async fn until_open(fault: &mut watch::Receiver<LinkFault>) -> bool {
    fault.wait_for(|f| !f.cut).await.is_ok()
}

/// Completes at the next reset of either link.
async fn next_reset(resets: &mut (watch::Receiver<u64>, watch::Receiver<u64>)) {
    tokio::select! {
        _ = resets.0.changed() => {}
        _ = resets.1.changed() => {}
    }
}

/// Counts an open connection on a link while it lives.
struct Open<'a>(&'a AtomicUsize);

impl<'a> Open<'a> {
    fn new(link: &'a Shaper) -> Self {
        link.connections.fetch_add(1, Ordering::Relaxed);
        Self(&link.connections)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` through `link`, counting bytes in `counter`;
/// while the link is cut, neither reads nor writes.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    link: &Shaper,
    counter: &IntCounter,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut open = link.fault.subscribe();
        let mut buffer = vec![0; CHUNK];
        loop {
            if !until_open(&mut open).await {
                break;
            }
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let at = link.reserve(n).await;
            counter.inc_by(n as u64);
            if tx.send((at, buffer[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        let mut open = link.fault.subscribe();
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            // Bytes in flight when the link was cut arrive after the heal.
            if !until_open(&mut open).await || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        if until_open(&mut open).await {
            let _ = to.shutdown().await;
        }
    };
    tokio::join!(read, write);
}

/// Forwards `client` to `target`: its bytes cross `forward` (counted in
/// `up`), the replies `back` (counted in `down`), until either side closes
/// or a reset of either link closes both with a TCP reset.
async fn forward_connection(
    mut client: TcpStream,
    target: SocketAddr,
    (forward, back): (&Shaper, &Shaper),
    (up, down): (&IntCounter, &IntCounter),
) {
    let _open = (Open::new(forward), Open::new(back));
    let mut resets = (forward.resets.subscribe(), back.resets.subscribe());
    // Opening a connection takes both directions: wait out a cut of either.
    let reach = async {
        let (mut there, mut back_again) = (forward.fault.subscribe(), back.fault.subscribe());
        loop {
            if !until_open(&mut there).await || !until_open(&mut back_again).await {
                return None;
            }
            if !there.borrow().cut {
                return Some(TcpStream::connect(target).await);
            }
        }
    };
    let mut server = tokio::select! {
        server = reach => match server {
            Some(Ok(server)) => server,
            Some(Err(e)) => {
                warn!(%target, "wan-proxy: cannot reach target: {e}");
                return;
            }
            None => return,
        },
        () = next_reset(&mut resets) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    debug!(%target, "wan-proxy: connected");
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let reset = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::select! {
            _ = async {
                tokio::join!(
                    pump(client_read, server_write, forward, up),
                    pump(server_read, client_write, back, down),
                )
            } => false,
            () = next_reset(&mut resets) => true,
        }
    };
    if reset {
        // Closing with SO_LINGER 0 sends a TCP reset, not an orderly FIN.
        let _ = (client.set_zero_linger(), server.set_zero_linger());
    }
}

/// Why the proxy cannot run.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    /// A route uses a link that is not configured.
    #[error("route {listen}: no link from {from:?} to {to:?}")]
    NoLink {
        /// The route's address.
        listen: SocketAddr,
        /// Its sending datacenter.
        from: String,
        /// Its receiving datacenter.
        to: String,
    },
    /// Listening failed.
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The fault API was asked to listen beyond this machine.
    #[error(transparent)]
    Fault(#[from] FaultError),
}

/// The fault series of the proxy.
struct FaultMetrics {
    /// `geoml_wan_faults_total{from, to, op}`.
    faults: IntCounterVec,
    /// `geoml_wan_link_cut{from, to}`.
    cut: IntGaugeVec,
    /// `geoml_wan_link_extra_delay_seconds{from, to}`.
    extra_delay: GaugeVec,
}

impl FaultMetrics {
    fn new(registry: &Registry) -> Result<Self, WanError> {
        let metrics = Self {
            faults: IntCounterVec::new(
                Opts::new(
                    "geoml_wan_faults_total",
                    "Fault operations (cut, heal, reset, delay) applied to each emulated WAN link",
                ),
                &["from", "to", "op"],
            )?,
            cut: IntGaugeVec::new(
                Opts::new(
                    "geoml_wan_link_cut",
                    "1 while an emulated WAN link is cut, else 0",
                ),
                &["from", "to"],
            )?,
            extra_delay: GaugeVec::new(
                Opts::new(
                    "geoml_wan_link_extra_delay_seconds",
                    "Delay added to an emulated WAN link's latency by a fault",
                ),
                &["from", "to"],
            )?,
        };
        registry.register(Box::new(metrics.faults.clone()))?;
        registry.register(Box::new(metrics.cut.clone()))?;
        registry.register(Box::new(metrics.extra_delay.clone()))?;
        Ok(metrics)
    }
}

/// The links of a running proxy and their faults, shared by its routes and
/// its control endpoint.
pub(crate) struct Network {
    /// (from, to) of each link, sorted.
    keys: Vec<(String, String)>,
    /// The link of each key.
    links: Vec<Arc<Shaper>>,
    metrics: FaultMetrics,
}

impl Network {
    fn new(config: &WanConfig, registry: &Registry) -> Result<Self, WanError> {
        let sorted: BTreeMap<(String, String), &Link> = config
            .links
            .iter()
            .map(|l| ((l.from.clone(), l.to.clone()), l))
            .collect();
        let metrics = FaultMetrics::new(registry)?;
        for (from, to) in sorted.keys() {
            metrics.cut.with_label_values(&[from, to]).set(0);
            metrics.extra_delay.with_label_values(&[from, to]).set(0.0);
        }
        Ok(Self {
            links: sorted.values().map(|l| Arc::new(Shaper::new(l))).collect(),
            keys: sorted.into_keys().collect(),
            metrics,
        })
    }

    /// The link `from → to` for `route`.
    fn link(&self, from: &str, to: &str, route: &Route) -> Result<Arc<Shaper>, WanError> {
        self.keys
            .iter()
            .position(|(a, b)| a == from && b == to)
            .map(|i| self.links[i].clone())
            .ok_or_else(|| WanError::NoLink {
                listen: route.listen,
                from: from.to_owned(),
                to: to.to_owned(),
            })
    }

    /// Applies `op` and returns the new state; idempotent (but every reset
    /// closes the connections open at the time).
    pub(crate) fn apply(&self, op: &FaultOp) -> Result<FaultState, FaultError> {
        let chosen = fault::resolve(op.scope(), &self.keys)?;
        for i in chosen {
            let (from, to) = &self.keys[i];
            let link = &self.links[i];
            link.fault.send_modify(|f| *f = op.apply(*f));
            if matches!(op, FaultOp::Reset { .. }) {
                link.resets.send_modify(|n| *n += 1);
            }
            let now = *link.fault.borrow();
            self.metrics
                .faults
                .with_label_values(&[from, to, op.name()])
                .inc();
            self.metrics
                .cut
                .with_label_values(&[from, to])
                .set(i64::from(now.cut));
            #[allow(clippy::cast_precision_loss)] // milliseconds of delay
            self.metrics
                .extra_delay
                .with_label_values(&[from, to])
                .set(now.extra_delay_ms as f64 / 1e3);
        }
        // At warn so that the default log filter keeps it.
        warn!("wan-proxy fault: {op}");
        Ok(self.state())
    }

    /// Every link's state.
    pub(crate) fn state(&self) -> FaultState {
        FaultState {
            links: self
                .keys
                .iter()
                .zip(&self.links)
                .map(|((from, to), link)| LinkState {
                    from: from.clone(),
                    to: to.clone(),
                    fault: *link.fault.borrow(),
                    connections: link.connections.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// Serves every route of `config` until `shutdown` completes; counts bytes
/// per link in `geoml_wan_bytes_total{from, to}` and faults in
/// `geoml_wan_faults_total{from, to, op}`, `geoml_wan_link_cut{from, to}`
/// and `geoml_wan_link_extra_delay_seconds{from, to}` in `registry`; with
/// `control`, serves the fault API there (see [`control`]).
///
/// # Errors
///
/// A route without its links, an address that cannot be bound, a control
/// address that is not loopback, metrics that cannot be registered.
pub async fn serve(
    config: &WanConfig,
    registry: &Registry,
    control: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WanError> {
    let bytes = IntCounterVec::new(
        Opts::new(
            "geoml_wan_bytes_total",
            "Bytes carried over each emulated WAN link",
        ),
        &["from", "to"],
    )?;
    registry.register(Box::new(bytes.clone()))?;
    let network = Arc::new(Network::new(config, registry)?);
    let mut tasks = Vec::new();
    for route in &config.routes {
        let forward = network.link(&route.from, &route.to, route)?;
        let back = network.link(&route.to, &route.from, route)?;
        let listener = TcpListener::bind(route.listen)
            .await
            .map_err(|e| WanError::Listen(route.listen, e))?;
        let up = bytes.with_label_values(&[&route.from, &route.to]);
        let down = bytes.with_label_values(&[&route.to, &route.from]);
        let target = route.target;
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((client, peer)) = listener.accept().await else {
                    continue;
                };
                debug!(%peer, %target, "wan-proxy: accepted");
                let (forward, back, up, down) =
                    (forward.clone(), back.clone(), up.clone(), down.clone());
                tokio::spawn(async move {
                    forward_connection(client, target, (&forward, &back), (&up, &down)).await;
                });
            }
        }));
    }
    if let Some(addr) = control {
        if !addr.ip().is_loopback() {
            return Err(FaultError::NotLoopback(addr).into());
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| WanError::Listen(addr, e))?;
        tasks.push(tokio::spawn(control::serve(listener, network.clone())));
    }
    shutdown.await;
    for task in tasks {
        task.abort();
    }
    Ok(())
}

/// Bytes per directed link in a scrape of the proxy's `/metrics`.
#[must_use]
pub fn link_bytes(metrics: &str) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("geoml_wan_bytes_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                kv.strip_prefix(name)
                    .and_then(|v| v.strip_prefix("=\""))
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_owned)
            })
        };
        if let (Some(from), Some(to), Ok(bytes)) =
            (label("from"), label("to"), value.trim().parse())
        {
            out.push((from, to, bytes));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact halves and minima
mod tests {
    use super::*;

    #[test]
    fn mesh_sums_latencies_and_takes_the_narrower_link() {
        let links = WanConfig::mesh(&[
            ("a".into(), 50.0, Some(20.0)),
            ("b".into(), 200.0, Some(5.0)),
        ]);
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].latency_ms, 125.0);
        assert_eq!(links[0].bandwidth_mbps, Some(5.0));
    }

    #[test]
    fn reads_link_bytes_from_a_scrape() {
        let text = "# TYPE geoml_wan_bytes_total counter\n\
            geoml_wan_bytes_total{from=\"a\",to=\"b\"} 42\n\
            geoml_wan_bytes_total{from=\"b\",to=\"a\"} 7\n";
        assert_eq!(
            link_bytes(text),
            [("a".into(), "b".into(), 42), ("b".into(), "a".into(), 7)]
        );
    }
}
