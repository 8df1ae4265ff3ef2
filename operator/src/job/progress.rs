//! Training progress read from the parameter servers' `/metrics`, through
//! the apiserver's pod proxy (which also reaches remote clusters).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Client, ResourceExt};

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
    /// `geoml_mirror_sent_bytes_total`: bytes sent to its mirrors in other
    /// datacenters (modes with mirrors; naive WAN BSP/SSP traffic is not in it).
    pub wan_sent_bytes: Option<i64>,
    /// `geoml_mirror_elements_updated_total`: parameter elements changed here.
    pub elements_updated: Option<f64>,
    /// `geoml_mirror_elements_sent_total`: of those, sent to the mirrors.
    pub elements_sent: Option<f64>,
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

/// Parses the Prometheus text format for the three series the operator reads.
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
        match name {
            "geoml_ps_clock" => progress.clock = Some(whole),
            "geoml_ps_metric" => progress.metric = Some(value),
            "geoml_mirror_sent_bytes_total" => {
                progress.wan_sent_bytes = Some(progress.wan_sent_bytes.unwrap_or(0) + whole);
            }
            "geoml_mirror_elements_updated_total" => {
                progress.elements_updated = Some(progress.elements_updated.unwrap_or(0.0) + value);
            }
            "geoml_mirror_elements_sent_total" => {
                progress.elements_sent = Some(progress.elements_sent.unwrap_or(0.0) + value);
            }
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
