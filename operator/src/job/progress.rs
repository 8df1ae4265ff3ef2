//! Training progress read from the parameter servers' `/metrics`, through
//! the apiserver's pod proxy (which also reaches remote clusters), and, once
//! a parameter server has exited, from its termination message: the final
//! values of the same series ([`geoml_crds::metrics::PROGRESS`]).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt};

use geoml_crds::metrics as names;

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
    /// `geoml_mirror_sent_bytes_total` plus `geoml_ps_wan_bytes_total`:
    /// bytes sent to its mirrors in other datacenters (ASP, FedAvg) and
    /// exchanged with workers of other datacenters (naive WAN BSP/SSP).
    pub wan_sent_bytes: Option<i64>,
    /// `geoml_mirror_elements_updated_total`: parameter elements changed here.
    pub elements_updated: Option<f64>,
    /// `geoml_mirror_elements_sent_total`: of those, sent to the mirrors.
    pub elements_sent: Option<f64>,
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
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or_default().trim();
        // Prometheus values are floats; clocks and byte counts are whole numbers.
        #[allow(clippy::cast_possible_truncation)]
        let whole = value as i64;
        let add = |total: Option<f64>| Some(total.unwrap_or(0.0) + value);
        match name {
            names::PS_CLOCK => progress.clock = Some(whole),
            names::PS_METRIC => progress.metric = Some(value),
            // Mirror traffic (ASP, FedAvg) and remote workers' traffic
            // (naive WAN BSP/SSP) both cross the WAN.
            names::MIRROR_SENT_BYTES | names::PS_WAN_BYTES => {
                progress.wan_sent_bytes = Some(progress.wan_sent_bytes.unwrap_or(0) + whole);
            }
            names::MIRROR_ELEMENTS_UPDATED => {
                progress.elements_updated = add(progress.elements_updated);
            }
            names::MIRROR_ELEMENTS_SENT => progress.elements_sent = add(progress.elements_sent),
            _ => {}
        }
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clock_metric_and_mirror_bytes() {
        let text = "# HELP geoml_ps_clock Clock.\n# TYPE geoml_ps_clock gauge\ngeoml_ps_clock 42\n\
                    geoml_ps_metric 0.81\n\
                    geoml_mirror_sent_bytes_total{datacenter=\"us-east\",shard=\"0\"} 3024\n\
                    geoml_ps_clock_other 7\n";
        assert_eq!(
            parse(text),
            ShardProgress {
                clock: Some(42),
                metric: Some(0.81),
                wan_sent_bytes: Some(3024),
                ..ShardProgress::default()
            }
        );
        assert_eq!(parse("garbage"), ShardProgress::default());
    }
}
