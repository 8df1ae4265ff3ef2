//! Prometheus metrics of the data plane and the `/metrics` endpoint that
//! serves them in the text format.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use prometheus::{
    Counter, Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Metrics of one parameter-server shard.
#[derive(Clone)]
pub struct PsMetrics {
    /// Lowest clock over the workers (`geoml_ps_clock`).
    pub clock: IntGauge,
    /// Pushes applied (`geoml_ps_updates_applied_total`).
    pub updates_applied: IntCounter,
    /// Retried pushes ignored (`geoml_ps_updates_duplicate_total`).
    pub updates_duplicate: IntCounter,
    /// Request bytes received from workers (`geoml_ps_lan_received_bytes_total`).
    pub bytes_received: IntCounter,
    /// Response bytes sent to workers (`geoml_ps_lan_sent_bytes_total`).
    pub bytes_sent: IntCounter,
    /// Requests refused, by reason (`geoml_ps_requests_rejected_total`).
    pub rejected: IntCounterVec,
    /// Time pulls waited for the consistency model (`geoml_ps_read_wait_seconds_total`).
    pub read_wait_seconds: Counter,
}

impl PsMetrics {
    /// Registers the metrics in `registry`, labelled with the shard.
    pub fn new(registry: &Registry, shard: u32) -> prometheus::Result<Self> {
        let opts =
            |name: &str, help: &str| Opts::new(name, help).const_label("shard", shard.to_string());
        let metrics = Self {
            clock: IntGauge::with_opts(opts("geoml_ps_clock", "Lowest clock over all workers"))?,
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
        };
        registry.register(Box::new(metrics.clock.clone()))?;
        registry.register(Box::new(metrics.updates_applied.clone()))?;
        registry.register(Box::new(metrics.updates_duplicate.clone()))?;
        registry.register(Box::new(metrics.bytes_received.clone()))?;
        registry.register(Box::new(metrics.bytes_sent.clone()))?;
        registry.register(Box::new(metrics.rejected.clone()))?;
        registry.register(Box::new(metrics.read_wait_seconds.clone()))?;
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
