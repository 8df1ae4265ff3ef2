//! Training progress read from the parameter servers' `/metrics`, through
//! the apiserver's pod proxy (which also reaches remote clusters), and, once
//! a parameter server has exited, from its termination message: the final
//! values of the same series ([`geoml_crds::metrics::PROGRESS`]).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt};

use geoml_crds::metrics as names;
use prometheus_parse::{Scrape, Value};

use super::build::METRICS_PORT;

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// What one parameter server reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardProgress {
    /// `geoml_ps_clock`.
    pub clock: Option<i64>,
    /// `geoml_ps_metric`: the latest evaluated metric.
    pub metric: Option<f64>,
    /// `geoml_ps_metric_clock`: the clock of that evaluation (0: none yet).
    pub metric_clock: Option<i64>,
    /// `geoml_mirror_sent_bytes_total`: bytes queued for its mirrors in
    /// other datacenters (ASP, FedAvg, DiLoCo), summed over peers.
    pub mirror_sent_bytes: Option<i64>,
    /// `geoml_ps_wan_bytes_total`: bytes exchanged with workers of other
    /// datacenters (naive WAN BSP/SSP).
    pub worker_wan_bytes: Option<i64>,
    /// `geoml_mirror_elements_updated_total`: parameter elements changed here.
    pub elements_updated: Option<f64>,
    /// `geoml_mirror_elements_sent_total`: of those, sent to the mirrors.
    pub elements_sent: Option<f64>,
    /// Per peer datacenter, the link to it.
    pub links: BTreeMap<String, LinkSample>,
}

/// What one shard reports of its link to one peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkSample {
    /// `geoml_mirror_link_sent_bytes_total`.
    pub sent_bytes: f64,
    /// `geoml_mirror_link_delivered_bytes_total`.
    pub delivered_bytes: f64,
    /// `geoml_mirror_rtt_seconds`, once measured.
    pub rtt_seconds: Option<f64>,
    /// `geoml_mirror_throughput_bytes_per_second`, once measured.
    pub throughput: Option<f64>,
}

impl ShardProgress {
    /// The latest evaluation this shard heard, with its clock; None before
    /// the first (a restarted shard shows 0 until the next evaluation).
    #[must_use]
    pub fn evaluation(&self) -> Option<(i64, f64)> {
        let clock = self.metric_clock.filter(|&c| c > 0)?;
        Some((clock, self.metric?))
    }

    /// Bytes this shard's datacenter sent over the WAN through it: what its
    /// links delivered (what was only queued when they have not reported
    /// yet) plus the traffic of other datacenters' workers.
    #[must_use]
    pub fn wan_bytes(&self) -> Option<i64> {
        let delivered: f64 = self.links.values().map(|l| l.delivered_bytes).sum();
        // Byte counts are whole numbers.
        #[allow(clippy::cast_possible_truncation)]
        let mirrors = if self.links.is_empty() {
            self.mirror_sent_bytes
        } else {
            Some(delivered as i64)
        };
        match (mirrors, self.worker_wan_bytes) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        }
    }
}

/// A parameter server's progress: its termination message once it has
/// exited, else its live metrics; None when neither can be read.
pub async fn read(client: &Client, pod: &Pod) -> Option<ShardProgress> {
    let message = pod
        .status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone());
    match message {
        Some(text) => Some(parse(&text)),
        None => scrape(client, pod).await,
    }
}

/// Reads a parameter server's metrics; None when it does not answer.
pub async fn scrape(client: &Client, pod: &Pod) -> Option<ShardProgress> {
    let namespace = pod.namespace()?;
    let url = format!(
        "/api/v1/namespaces/{namespace}/pods/{}:{METRICS_PORT}/proxy/metrics",
        pod.name_any()
    );
    let request = http::Request::get(url).body(Vec::new()).ok()?;
    let text = tokio::time::timeout(SCRAPE_TIMEOUT, client.request_text(request))
        .await
        .ok()?
        .ok()?;
    Some(parse(&text))
}

/// Parses the Prometheus text format for the series the operator reads.
#[must_use]
pub fn parse(text: &str) -> ShardProgress {
    let mut progress = ShardProgress::default();
    let Ok(scrape) = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))) else {
        return progress;
    };
    for sample in scrape.samples {
        let (Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value)) = sample.value
        else {
            continue;
        };
        // Prometheus values are floats; clocks and byte counts are whole numbers.
        #[allow(clippy::cast_possible_truncation)]
        let whole = value as i64;
        let add = |total: Option<i64>| Some(total.unwrap_or(0) + whole);
        let addf = |total: Option<f64>| Some(total.unwrap_or(0.0) + value);
        let peer = sample.labels.get(names::PEER_LABEL).unwrap_or_default();
        let links = &mut progress.links;
        match sample.metric.as_str() {
            names::PS_CLOCK => progress.clock = Some(whole),
            names::PS_METRIC => progress.metric = Some(value),
            names::PS_METRIC_CLOCK => progress.metric_clock = Some(whole),
            names::MIRROR_SENT_BYTES => {
                progress.mirror_sent_bytes = add(progress.mirror_sent_bytes);
            }
            names::PS_WAN_BYTES => progress.worker_wan_bytes = add(progress.worker_wan_bytes),
            names::MIRROR_ELEMENTS_UPDATED => {
                progress.elements_updated = addf(progress.elements_updated);
            }
            names::MIRROR_ELEMENTS_SENT => progress.elements_sent = addf(progress.elements_sent),
            names::MIRROR_LINK_SENT_BYTES => link(links, peer).sent_bytes += value,
            names::MIRROR_LINK_DELIVERED_BYTES => link(links, peer).delivered_bytes += value,
            // Unmeasured yet: the runtime reports zero.
            names::MIRROR_RTT if value > 0.0 => link(links, peer).rtt_seconds = Some(value),
            names::MIRROR_THROUGHPUT if value > 0.0 => link(links, peer).throughput = Some(value),
            _ => {}
        }
    }
    progress
}

fn link<'a>(links: &'a mut BTreeMap<String, LinkSample>, peer: &str) -> &'a mut LinkSample {
    links.entry(peer.to_owned()).or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clock_metric_and_mirror_bytes() {
        let text = "# HELP geoml_ps_clock Clock.\n# TYPE geoml_ps_clock gauge\ngeoml_ps_clock 42\n\
                    geoml_ps_metric 0.81\n\
                    geoml_ps_metric_clock 40\n\
                    geoml_mirror_sent_bytes_total{datacenter=\"us-east\",shard=\"0\"} 3024\n\
                    geoml_ps_clock_other 7\n";
        assert_eq!(
            parse(text),
            ShardProgress {
                clock: Some(42),
                metric: Some(0.81),
                metric_clock: Some(40),
                mirror_sent_bytes: Some(3024),
                ..ShardProgress::default()
            }
        );
        assert_eq!(parse(text).wan_bytes(), Some(3024));
        assert_eq!(parse(text).evaluation(), Some((40, 0.81)));
        // A shard that has not heard an evaluation yet shows none.
        assert_eq!(
            parse("geoml_ps_metric 0\ngeoml_ps_metric_clock 0\n").evaluation(),
            None
        );
        assert_eq!(parse("garbage"), ShardProgress::default());
    }

    #[test]
    fn links_count_delivered_bytes_per_peer() {
        let text = "geoml_mirror_sent_bytes_total{datacenter=\"a\",shard=\"0\"} 900\n\
                    geoml_mirror_link_sent_bytes_total{datacenter=\"a\",peer=\"b\",shard=\"0\"} 500\n\
                    geoml_mirror_link_delivered_bytes_total{datacenter=\"a\",peer=\"b\",shard=\"0\"} 400\n\
                    geoml_mirror_link_delivered_bytes_total{datacenter=\"a\",peer=\"c\",shard=\"0\"} 300\n\
                    geoml_mirror_rtt_seconds{datacenter=\"a\",peer=\"b\",shard=\"0\"} 0.05\n\
                    geoml_mirror_rtt_seconds{datacenter=\"a\",peer=\"c\",shard=\"0\"} 0\n";
        let progress = parse(text);
        assert_eq!(progress.wan_bytes(), Some(700), "delivered, not queued");
        let b = &progress.links["b"];
        assert_eq!(
            (b.sent_bytes, b.delivered_bytes, b.rtt_seconds),
            (500.0, 400.0, Some(0.05))
        );
        assert_eq!(
            progress.links["c"].rtt_seconds, None,
            "zero means unmeasured"
        );
    }
}
