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

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

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
                        bandwidth_mbps: match (ba, bb) {
                            (Some(x), Some(y)) => Some(x.min(*y)),
                            (x, y) => x.or(*y),
                        },
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
}

impl Shaper {
    /// Reserves the link for `bytes` once it is free; returns when they
    /// arrive at the other end.
    async fn reserve(&self, bytes: usize) -> Instant {
        let Some(rate) = self.bytes_per_second else {
            return Instant::now() + self.latency;
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
                    return *free_at + self.latency;
                }
                *free_at - now
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Copies `from` to `to` through `link`, counting bytes in `counter`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Shaper>,
    counter: prometheus::IntCounter,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buffer = vec![0; CHUNK];
    loop {
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
    drop(tx);
    let _ = writer.await;
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
}

/// Serves every route of `config` until `shutdown` completes; counts bytes
/// per link in `geoml_wan_bytes_total{from, to}` in `registry`.
pub async fn serve(
    config: &WanConfig,
    registry: &Registry,
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
    let links: HashMap<(String, String), Arc<Shaper>> = config
        .links
        .iter()
        .map(|l| {
            let shaper = Shaper {
                latency: Duration::from_secs_f64(l.latency_ms.max(0.0) / 1e3),
                bytes_per_second: l.bandwidth_mbps.map(|m| m * 1e6 / 8.0),
                free_at: Mutex::new(Instant::now()),
            };
            ((l.from.clone(), l.to.clone()), Arc::new(shaper))
        })
        .collect();
    let link = |from: &str, to: &str, route: &Route| {
        links
            .get(&(from.to_owned(), to.to_owned()))
            .cloned()
            .ok_or_else(|| WanError::NoLink {
                listen: route.listen,
                from: from.to_owned(),
                to: to.to_owned(),
            })
    };
    let mut tasks = Vec::new();
    for route in &config.routes {
        let forward = link(&route.from, &route.to, route)?;
        let back = link(&route.to, &route.from, route)?;
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
                let (forward, back, up, down) =
                    (forward.clone(), back.clone(), up.clone(), down.clone());
                tokio::spawn(async move {
                    let server = match TcpStream::connect(target).await {
                        Ok(server) => server,
                        Err(e) => {
                            warn!(%target, "wan-proxy: cannot reach target: {e}");
                            return;
                        }
                    };
                    debug!(%peer, %target, "wan-proxy: connected");
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, forward, up),
                        pump(server_read, client_write, back, down),
                    );
                });
            }
        }));
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
