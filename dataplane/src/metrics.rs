//! Prometheus metrics of the data plane and the `/metrics` endpoint that
//! serves them in the text format.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use geoml_crds::metrics as names;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Metrics of one parameter-server shard.
#[derive(Clone)]
pub struct PsMetrics {
    /// Lowest clock over the workers ([`names::PS_CLOCK`]).
    pub clock: IntGauge,
    /// Pushes applied (`geoml_ps_updates_applied_total`).
    pub updates_applied: IntCounter,
    /// Retried pushes ignored (`geoml_ps_updates_duplicate_total`).
    pub updates_duplicate: IntCounter,
    /// Request bytes received from workers (`geoml_ps_lan_received_bytes_total`).
    pub bytes_received: IntCounter,
    /// Response bytes sent to workers (`geoml_ps_lan_sent_bytes_total`).
    pub bytes_sent: IntCounter,
    /// Request and response bytes exchanged with workers of other
    /// datacenters ([`names::PS_WAN_BYTES`]).
    pub wan_bytes: IntCounter,
    /// Requests refused, by reason (`geoml_ps_requests_rejected_total`).
    pub rejected: IntCounterVec,
    /// Time pulls waited for the consistency model (`geoml_ps_read_wait_seconds_total`).
    pub read_wait_seconds: Counter,
    /// Latest evaluation reported ([`names::PS_METRIC`]).
    pub metric: Gauge,
    /// The clock of that evaluation ([`names::PS_METRIC_CLOCK`]).
    pub metric_clock: IntGauge,
    /// Mirror synchronisation (`geoml_mirror_*`).
    pub mirror: MirrorMetrics,
}

/// Metrics of a shard's synchronisation with its mirrors in other datacenters.
#[derive(Clone)]
pub struct MirrorMetrics {
    elements_updated: IntCounter,
    elements_sent: IntCounter,
    bytes_sent: IntCounter,
    threshold: Gauge,
    barrier_blocks: IntCounter,
    barrier_wait: Counter,
    clock_blocks: IntCounter,
    clock_wait: Counter,
    mirror_clock: IntGauge,
    peer_clock: IntGaugeVec,
    skew: IntGauge,
    rtt: GaugeVec,
    throughput: GaugeVec,
    link_sent: IntCounterVec,
    link_delivered: IntCounterVec,
    peers_reachable: IntGauge,
    peer_reachable: IntGaugeVec,
    peer_queued: IntGaugeVec,
}

fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

fn catch_up_f(counter: &Counter, total: f64) {
    let delta = total - counter.get();
    if delta > 0.0 {
        counter.inc_by(delta);
    }
}

impl MirrorMetrics {
    fn new(opts: &dyn Fn(&str, &str) -> Opts) -> prometheus::Result<Self> {
        Ok(Self {
            elements_updated: IntCounter::with_opts(opts(
                names::MIRROR_ELEMENTS_UPDATED,
                "Parameter updates made by this datacenter's workers",
            ))?,
            elements_sent: IntCounter::with_opts(opts(
                names::MIRROR_ELEMENTS_SENT,
                "Accumulated parameter updates sent to the mirrors (significant ones)",
            ))?,
            bytes_sent: IntCounter::with_opts(opts(
                names::MIRROR_SENT_BYTES,
                "Bytes of mirror messages sent, summed over peers",
            ))?,
            threshold: Gauge::with_opts(opts(
                names::MIRROR_THRESHOLD,
                "Current significance threshold",
            ))?,
            barrier_blocks: IntCounter::with_opts(opts(
                "geoml_mirror_barrier_blocks_total",
                "Reads held by the selective barrier",
            ))?,
            barrier_wait: Counter::with_opts(opts(
                "geoml_mirror_barrier_wait_seconds_total",
                "Seconds reads were held by the selective barrier",
            ))?,
            clock_blocks: IntCounter::with_opts(opts(
                "geoml_mirror_clock_blocks_total",
                "Reads held by the mirror-clock bound or an averaging round",
            ))?,
            clock_wait: Counter::with_opts(opts(
                "geoml_mirror_clock_wait_seconds_total",
                "Seconds reads were held by the mirror-clock bound or an averaging round",
            ))?,
            mirror_clock: IntGauge::with_opts(opts(
                "geoml_mirror_clock",
                "This datacenter's mirror clock",
            ))?,
            peer_clock: IntGaugeVec::new(
                opts(
                    "geoml_mirror_peer_clock",
                    "Last mirror clock heard from each peer",
                ),
                &[names::PEER_LABEL],
            )?,
            skew: IntGauge::with_opts(opts(
                "geoml_mirror_max_skew",
                "Most mirror clocks this datacenter ran ahead of where its slowest peer may have been (what the mirror-clock bound counts)",
            ))?,
            rtt: GaugeVec::new(
                opts(names::MIRROR_RTT, "Round-trip time to each peer"),
                &[names::PEER_LABEL],
            )?,
            throughput: GaugeVec::new(
                opts(
                    names::MIRROR_THROUGHPUT,
                    "Throughput acknowledged updates showed, per peer",
                ),
                &[names::PEER_LABEL],
            )?,
            link_sent: IntCounterVec::new(
                opts(
                    names::MIRROR_LINK_SENT_BYTES,
                    "Mirror message bytes handed to the link to each peer",
                ),
                &[names::PEER_LABEL],
            )?,
            link_delivered: IntCounterVec::new(
                opts(
                    names::MIRROR_LINK_DELIVERED_BYTES,
                    "Mirror message bytes each peer acknowledged",
                ),
                &[names::PEER_LABEL],
            )?,
            peers_reachable: IntGauge::with_opts(opts(
                names::MIRROR_PEERS_REACHABLE,
                "Peers the mirror-clock bound counts: heard within the peer timeout and training",
            ))?,
            peer_reachable: IntGaugeVec::new(
                opts(
                    names::MIRROR_PEER_REACHABLE,
                    "1 while a peer was heard from within the peer timeout, else 0",
                ),
                &[names::PEER_LABEL],
            )?,
            peer_queued: IntGaugeVec::new(
                opts(
                    names::MIRROR_PEER_QUEUED_ELEMENTS,
                    "Elements waiting for each peer, queued or in flight (coalesced: at most the shard's size)",
                ),
                &[names::PEER_LABEL],
            )?,
        })
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.elements_updated.clone()))?;
        registry.register(Box::new(self.elements_sent.clone()))?;
        registry.register(Box::new(self.bytes_sent.clone()))?;
        registry.register(Box::new(self.threshold.clone()))?;
        registry.register(Box::new(self.barrier_blocks.clone()))?;
        registry.register(Box::new(self.barrier_wait.clone()))?;
        registry.register(Box::new(self.clock_blocks.clone()))?;
        registry.register(Box::new(self.clock_wait.clone()))?;
        registry.register(Box::new(self.mirror_clock.clone()))?;
        registry.register(Box::new(self.peer_clock.clone()))?;
        registry.register(Box::new(self.skew.clone()))?;
        registry.register(Box::new(self.rtt.clone()))?;
        registry.register(Box::new(self.throughput.clone()))?;
        registry.register(Box::new(self.link_sent.clone()))?;
        registry.register(Box::new(self.link_delivered.clone()))?;
        registry.register(Box::new(self.peers_reachable.clone()))?;
        registry.register(Box::new(self.peer_reachable.clone()))?;
        registry.register(Box::new(self.peer_queued.clone()))
    }
}

impl PsMetrics {
    /// Brings the mirror metrics up to `status`.
    pub fn observe_mirror(&self, status: &crate::pb::MirrorStatus) {
        let m = &self.mirror;
        catch_up(&m.elements_updated, status.elements_updated);
        catch_up(&m.elements_sent, status.elements_sent);
        catch_up(&m.bytes_sent, status.bytes_sent);
        catch_up(&m.barrier_blocks, status.barrier_blocks);
        catch_up_f(&m.barrier_wait, status.barrier_wait_seconds);
        catch_up(&m.clock_blocks, status.clock_blocks);
        catch_up_f(&m.clock_wait, status.clock_wait_seconds);
        m.threshold.set(status.threshold);
        m.mirror_clock
            .set(i64::try_from(status.mirror_clock).unwrap_or(i64::MAX));
        m.skew
            .set(i64::try_from(status.max_skew).unwrap_or(i64::MAX));
        m.peers_reachable.set(i64::from(status.peers_reachable));
        for peer in &status.peers {
            let name = [peer.datacenter.as_str()];
            m.peer_clock
                .with_label_values(&name)
                .set(i64::try_from(peer.mirror_clock).unwrap_or(i64::MAX));
            m.rtt.with_label_values(&name).set(peer.rtt_seconds);
            m.throughput
                .with_label_values(&name)
                .set(peer.throughput_bytes_per_second);
            catch_up(&m.link_sent.with_label_values(&name), peer.sent_bytes);
            catch_up(
                &m.link_delivered.with_label_values(&name),
                peer.delivered_bytes,
            );
            m.peer_reachable
                .with_label_values(&name)
                .set(i64::from(peer.reachable));
            m.peer_queued
                .with_label_values(&name)
                .set(i64::try_from(peer.queued_elements).unwrap_or(i64::MAX));
        }
    }
}

impl PsMetrics {
    /// Registers the metrics in `registry`, labelled with the shard and its
    /// datacenter.
    pub fn new(registry: &Registry, datacenter: &str, shard: u32) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help)
                .const_label(names::DATACENTER_LABEL, datacenter)
                .const_label(names::SHARD_LABEL, shard.to_string())
        };
        let metrics = Self {
            clock: IntGauge::with_opts(opts(names::PS_CLOCK, "Lowest clock over all workers"))?,
            updates_applied: IntCounter::with_opts(opts(
                "geoml_ps_updates_applied_total",
                "Pushes applied to the shard",
            ))?,
            updates_duplicate: IntCounter::with_opts(opts(
                "geoml_ps_updates_duplicate_total",
                "Retried pushes whose clock was already applied",
            ))?,
            bytes_received: IntCounter::with_opts(opts(
                "geoml_ps_lan_received_bytes_total",
                "Bytes of requests received from workers",
            ))?,
            bytes_sent: IntCounter::with_opts(opts(
                "geoml_ps_lan_sent_bytes_total",
                "Bytes of responses sent to workers",
            ))?,
            wan_bytes: IntCounter::with_opts(opts(
                names::PS_WAN_BYTES,
                "Bytes of requests and responses exchanged with workers of other datacenters",
            ))?,
            rejected: IntCounterVec::new(
                opts(
                    "geoml_ps_requests_rejected_total",
                    "Requests refused, by reason",
                ),
                &["reason"],
            )?,
            read_wait_seconds: Counter::with_opts(opts(
                "geoml_ps_read_wait_seconds_total",
                "Seconds pulls waited for slower workers",
            ))?,
            metric: Gauge::with_opts(opts(
                names::PS_METRIC,
                "Latest evaluation metric the evaluating worker reported",
            ))?,
            metric_clock: IntGauge::with_opts(opts(
                names::PS_METRIC_CLOCK,
                "Clock of the latest evaluation reported (0: none yet)",
            ))?,
            mirror: MirrorMetrics::new(&opts)?,
        };
        registry.register(Box::new(metrics.clock.clone()))?;
        registry.register(Box::new(metrics.updates_applied.clone()))?;
        registry.register(Box::new(metrics.updates_duplicate.clone()))?;
        registry.register(Box::new(metrics.bytes_received.clone()))?;
        registry.register(Box::new(metrics.bytes_sent.clone()))?;
        registry.register(Box::new(metrics.wan_bytes.clone()))?;
        registry.register(Box::new(metrics.rejected.clone()))?;
        registry.register(Box::new(metrics.read_wait_seconds.clone()))?;
        registry.register(Box::new(metrics.metric.clone()))?;
        registry.register(Box::new(metrics.metric_clock.clone()))?;
        metrics.mirror.register(registry)?;
        Ok(metrics)
    }
}

/// Metrics of one worker.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// Iterations completed (`geoml_worker_clock`).
    pub clock: IntGauge,
    /// Latest evaluation metric (`geoml_worker_metric`).
    pub metric: Gauge,
    /// Seconds computing gradients (`geoml_worker_compute_seconds_total`).
    pub compute_seconds: Counter,
    /// Seconds waiting on parameter servers (`geoml_worker_communication_seconds_total`).
    pub communication_seconds: Counter,
}

impl WorkerMetrics {
    /// Registers the metrics in `registry`, labelled with the worker.
    pub fn new(registry: &Registry, worker: u32) -> prometheus::Result<Self> {
        let opts = |name: &str, help: &str| {
            Opts::new(name, help).const_label("worker", worker.to_string())
        };
        let metrics = Self {
            clock: IntGauge::with_opts(opts("geoml_worker_clock", "Iterations completed"))?,
            metric: Gauge::with_opts(opts(
                "geoml_worker_metric",
                "Latest evaluation metric on held-out data",
            ))?,
            compute_seconds: Counter::with_opts(opts(
                "geoml_worker_compute_seconds_total",
                "Seconds spent computing gradients",
            ))?,
            communication_seconds: Counter::with_opts(opts(
                "geoml_worker_communication_seconds_total",
                "Seconds spent pulling and pushing",
            ))?,
        };
        registry.register(Box::new(metrics.clock.clone()))?;
        registry.register(Box::new(metrics.metric.clone()))?;
        registry.register(Box::new(metrics.compute_seconds.clone()))?;
        registry.register(Box::new(metrics.communication_seconds.clone()))?;
        Ok(metrics)
    }
}

/// Serves `registry` at `http://addr/metrics` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = Vec::new();
                let encoder = TextEncoder::new();
                // Encoding into a Vec only fails on invalid metric families,
                // which registration already rejected.
                let _ = encoder.encode(&registry.gather(), &mut body);
                ([(CONTENT_TYPE, encoder.format_type().to_owned())], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The samples of the series the operator reads for progress
/// ([`names::PROGRESS`]), in the Prometheus text format, without comments:
/// small enough for a pod's termination message (4 KiB).
#[must_use]
pub fn progress_text(registry: &Registry) -> String {
    let families: Vec<_> = registry
        .gather()
        .into_iter()
        .filter(|f| names::PROGRESS.contains(&f.name()))
        .collect();
    let mut text = String::new();
    // Encoding only fails on invalid metric families, which registration rejected.
    let _ = TextEncoder::new().encode_utf8(&families, &mut text);
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    samples.join("\n") + "\n"
}

/// Fetches `http://addr/metrics` (a plain HTTP/1.0 GET; enough for our own
/// endpoints) and returns the body.
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    match response.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.to_owned())
        }
        _ => Err(std::io::Error::other(format!(
            "unexpected answer from {addr}: {}",
            response.lines().next().unwrap_or_default()
        ))),
    }
}
