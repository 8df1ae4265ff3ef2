//! The report of a local run (`geoml run --json`, one per mode in
//! `geoml compare`), shared by parameter-server runs and Collaborative ones,
//! and its terminal table.

use std::fmt::Write as _;

use comfy_table::{CellAlignment, Table, presets};
use geoml_proto as pb;
use serde::Serialize;

/// One evaluation of the model during a run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetricSample {
    /// Seconds since training started (for `centralized`, since the data
    /// started to move).
    pub seconds: f64,
    /// Clock of the evaluating worker.
    pub clock: u64,
    /// The metric.
    pub metric: f64,
}

/// Bytes one emulated WAN link carried.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LinkBytes {
    /// Sending datacenter.
    pub from: String,
    /// Receiving datacenter.
    pub to: String,
    /// TCP payload bytes (gRPC with its HTTP/2 framing, or shipped data).
    pub bytes: u64,
}

/// The rate one emulated WAN link carried once the run settled.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LinkRate {
    /// Sending datacenter.
    pub from: String,
    /// Receiving datacenter.
    pub to: String,
    /// TCP payload bytes per second (as [`LinkBytes::bytes`]) from
    /// [`SETTLED_AFTER`] of the training time to its end.
    pub settled_bytes_per_second: f64,
    /// The link's budget under the `BandwidthBudget` threshold schedule,
    /// for all the sending datacenter's parameter servers together.
    pub budget_bytes_per_second: Option<f64>,
}

/// The share of a run's training time after which its links count as
/// settled ([`LinkRate`]).
pub const SETTLED_AFTER: f64 = 0.2;

/// The WAN bytes on the wire `seconds` into training: interpolated between
/// `samples` (seconds since training started, and the bytes per link by
/// then, oldest first; none before 0 bytes at 0 s), or the run's total,
/// `links`, past the last one.
#[must_use]
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)] // byte counts are far below 2^52
pub fn bytes_at(samples: &[(f64, Vec<LinkBytes>)], seconds: f64, links: &[LinkBytes]) -> u64 {
    let sum = |links: &[LinkBytes]| links.iter().map(|l| l.bytes).sum::<u64>();
    let mut before = (0.0, 0);
    for (at, links) in samples {
        let bytes = sum(links);
        if *at >= seconds {
            let share = if *at > before.0 {
                (seconds - before.0) / (at - before.0)
            } else {
                1.0
            };
            return before.1 + (share * bytes.saturating_sub(before.1) as f64).round() as u64;
        }
        before = (*at, bytes);
    }
    sum(links)
}

/// Each link's rate from [`SETTLED_AFTER`] of `samples` (seconds since
/// training started, and the bytes per link by then; oldest first, taken
/// while training ran) to the last sample, with its budget from `budget`
/// (bytes per second, by sending and receiving datacenter). Empty with
/// fewer than two samples in that span.
#[must_use]
pub fn settled_rates(
    samples: &[(f64, Vec<LinkBytes>)],
    budget: impl Fn(&str, &str) -> Option<f64>,
) -> Vec<LinkRate> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Vec::new();
    };
    let settled = first.0 + SETTLED_AFTER * (last.0 - first.0);
    let Some(start) = samples.iter().find(|s| s.0 >= settled) else {
        return Vec::new();
    };
    let seconds = last.0 - start.0;
    if seconds <= 0.0 {
        return Vec::new();
    }
    last.1
        .iter()
        .map(|link| {
            let before = start
                .1
                .iter()
                .find(|l| l.from == link.from && l.to == link.to)
                .map_or(0, |l| l.bytes);
            #[allow(clippy::cast_precision_loss)] // byte counts are far below 2^52
            let bytes = link.bytes.saturating_sub(before) as f64;
            LinkRate {
                from: link.from.clone(),
                to: link.to.clone(),
                settled_bytes_per_second: bytes / seconds,
                budget_bytes_per_second: budget(&link.from, &link.to),
            }
        })
        .collect()
}

/// How one datacenter's model fared.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DatacenterReport {
    /// The datacenter.
    pub name: String,
    /// Clocks its slowest worker completed.
    pub clocks: u64,
    /// Its final model's metric: the model its parameter servers hold once
    /// training stopped and (with mirrors) every update arrived, evaluated
    /// on the held-out data by the launcher.
    pub final_metric: Option<f64>,
    /// When that model first met the target.
    pub time_to_target_seconds: Option<f64>,
    /// Every evaluation of that model, oldest first.
    pub metric_history: Vec<MetricSample>,
}

impl DatacenterReport {
    /// When every one of `datacenters` met the target; `None` if one never
    /// did.
    #[must_use]
    pub fn all_at_target(datacenters: &[Self]) -> Option<f64> {
        datacenters
            .iter()
            .map(|d| d.time_to_target_seconds)
            .collect::<Option<Vec<f64>>>()
            .and_then(|t| t.into_iter().reduce(f64::max))
    }

    /// The mean of their final metrics, if any has one.
    #[must_use]
    pub fn mean_final(datacenters: &[Self]) -> Option<f64> {
        let finals: Vec<f64> = datacenters.iter().filter_map(|d| d.final_metric).collect();
        #[allow(clippy::cast_precision_loss)] // a handful of datacenters
        (!finals.is_empty()).then(|| finals.iter().sum::<f64>() / finals.len() as f64)
    }
}

/// Mirror synchronisation of a run, summed over every shard.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MirrorTotals {
    /// Of the parameter updates workers made, the fraction sent to mirrors
    /// (modes with mirrors).
    pub updates_sent_fraction: Option<f64>,
    /// Reads the selective barrier held.
    pub barrier_blocks: u64,
    /// Seconds reads waited at the selective barrier, summed.
    pub barrier_wait_seconds: f64,
    /// Reads the mirror-clock bound (or an averaging round) held.
    pub clock_blocks: u64,
    /// Seconds reads waited for the mirror-clock bound or a round, summed.
    pub clock_wait_seconds: f64,
    /// Most mirror clocks any datacenter ran ahead of its slowest peer.
    pub max_mirror_skew: u64,
    /// Bytes of the mirror messages the shards sent (gRPC payloads, summed
    /// over peers): the WAN bytes less framing, TLS and connection set-up.
    pub mirror_payload_bytes: u64,
    /// Lowest and highest significance threshold the shards ended with
    /// (Gaia; schedules move it).
    pub final_thresholds: Option<(f64, f64)>,
}

impl MirrorTotals {
    /// The totals of the final statuses of every shard.
    #[must_use]
    pub fn of(statuses: &[pb::StatusResponse]) -> Self {
        let mirrors: Vec<&pb::MirrorStatus> =
            statuses.iter().filter_map(|s| s.mirror.as_ref()).collect();
        let updated: u64 = mirrors.iter().map(|m| m.elements_updated).sum();
        let sent: u64 = mirrors.iter().map(|m| m.elements_sent).sum();
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        Self {
            updates_sent_fraction: (updated > 0).then(|| sent as f64 / updated as f64),
            barrier_blocks: mirrors.iter().map(|m| m.barrier_blocks).sum(),
            barrier_wait_seconds: mirrors.iter().map(|m| m.barrier_wait_seconds).sum(),
            clock_blocks: mirrors.iter().map(|m| m.clock_blocks).sum(),
            clock_wait_seconds: mirrors.iter().map(|m| m.clock_wait_seconds).sum(),
            max_mirror_skew: mirrors.iter().map(|m| m.max_skew).max().unwrap_or(0),
            mirror_payload_bytes: mirrors.iter().map(|m| m.bytes_sent).sum(),
            final_thresholds: mirrors
                .iter()
                .map(|m| (m.threshold, m.threshold))
                .reduce(|(lo, hi), (a, b)| (lo.min(a), hi.max(b))),
        }
    }
}

/// The `--json` report of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The TrainingJob's name.
    pub job: String,
    /// `lan`, `gaia`, `bsp-wan`, ...
    pub mode: String,
    /// `accuracy` or `rmse`.
    pub metric_name: String,
    /// The final model's metric ([`DatacenterReport::final_metric`]); with
    /// a model per datacenter, the mean over them.
    pub final_metric: Option<f64>,
    /// The stopping rule's target, if any.
    pub target_metric: Option<f64>,
    /// Seconds from the start of training until every datacenter's model
    /// met the target; `None` if one never did.
    pub time_to_target_seconds: Option<f64>,
    /// Seconds of the whole run, start-up included.
    pub wall_seconds: f64,
    /// Clocks the slowest worker completed.
    pub clocks: u64,
    /// Why training stopped.
    pub stop_reason: String,
    /// Bytes between workers and parameter servers (gRPC payloads, both ways).
    pub lan_bytes_total: u64,
    /// Bytes between datacenters: everything the emulated WAN links carried.
    pub wan_bytes_total: u64,
    /// Of those, the bytes on the wire by [`Self::time_to_target_seconds`]
    /// ([`bytes_at`]): what it took until every datacenter's model met the
    /// target; the rest is what followed (Gaia's final flush of what each
    /// datacenter held back).
    pub wan_bytes_to_target: Option<u64>,
    /// CPU seconds (user and system) of the run's processes: parameter
    /// servers, workers and the WAN emulator, not the launcher (collaborative
    /// modes: not measured). On a machine with fewer cores than the roles
    /// want, time follows it.
    pub cpu_seconds: Option<f64>,
    /// Bytes per directed WAN link.
    pub wan_links: Vec<LinkBytes>,
    /// Per directed WAN link, its rate once settled, and its budget.
    pub wan_link_rates: Vec<LinkRate>,
    /// Mirror synchronisation, summed over shards.
    #[serde(flatten)]
    pub mirrors: MirrorTotals,
    /// Seconds spent shipping the data in (`centralized`).
    pub shipping_seconds: Option<f64>,
    /// Parameter-server processes.
    pub parameter_servers: usize,
    /// Worker processes.
    pub workers: usize,
    /// Per datacenter.
    pub per_datacenter: Vec<DatacenterReport>,
    /// Every evaluation of the first datacenter's model, oldest first.
    pub metric_history: Vec<MetricSample>,
    /// Collaborative modes: adaptation after drift, model bytes per site,
    /// training seconds (flat in the JSON, absent in other modes).
    #[serde(flatten)]
    pub collaborative: CollaborativeTotals,
}

impl Report {
    /// The report as a table for the terminal.
    #[must_use]
    pub fn table(&self) -> String {
        let mut t = String::new();
        let metric = self
            .final_metric
            .map_or("-".to_owned(), |m| format!("{m:.4}"));
        let target = match (self.target_metric, self.time_to_target_seconds) {
            (Some(target), Some(s)) => format!(" (target {target} reached after {s:.1} s)"),
            (Some(target), None) => format!(" (target {target} not reached)"),
            _ => String::new(),
        };
        let _ = writeln!(t, "job          {}", self.job);
        let _ = writeln!(t, "mode         {}", self.mode);
        let _ = writeln!(
            t,
            "processes    {} parameter servers, {} workers",
            self.parameter_servers, self.workers
        );
        let _ = writeln!(t, "stopped      {}", self.stop_reason);
        let _ = writeln!(t, "clocks       {}", self.clocks);
        let _ = writeln!(t, "{:<12} {metric}{target}", self.metric_name);
        let _ = writeln!(t, "wall time    {:.1} s", self.wall_seconds);
        let _ = writeln!(t, "LAN bytes    {}", human_bytes(self.lan_bytes_total));
        let by_target = self.wan_bytes_to_target.map_or(String::new(), |b| {
            format!(" ({} by the target)", human_bytes(b))
        });
        let _ = writeln!(
            t,
            "WAN bytes    {}{by_target}",
            human_bytes(self.wan_bytes_total)
        );
        if let Some(cpu) = self.cpu_seconds {
            let _ = writeln!(t, "CPU          {cpu:.1} s");
        }
        let m = &self.mirrors;
        if let Some(fraction) = m.updates_sent_fraction {
            let _ = writeln!(t, "sent         {:.2}% of updates", 100.0 * fraction);
            let _ = writeln!(
                t,
                "barrier      {} reads held, {:.1} s",
                m.barrier_blocks, m.barrier_wait_seconds
            );
            let _ = writeln!(
                t,
                "clock bound  {} reads held, {:.1} s, max skew {}",
                m.clock_blocks, m.clock_wait_seconds, m.max_mirror_skew
            );
        }
        for link in &self.wan_link_rates {
            let budget = link.budget_bytes_per_second.map_or(String::new(), |b| {
                format!(
                    " (budget {:.2} Mbit/s, {:+.0}%)",
                    b * 8.0 / 1e6,
                    100.0 * (link.settled_bytes_per_second / b - 1.0)
                )
            });
            let _ = writeln!(
                t,
                "WAN link     {} → {}: {:.2} Mbit/s once settled{budget}",
                link.from,
                link.to,
                link.settled_bytes_per_second * 8.0 / 1e6
            );
        }
        if let Some(s) = self.shipping_seconds {
            let _ = writeln!(t, "shipping     {s:.1} s");
        }
        if self.per_datacenter.len() > 1 {
            let rows = self.per_datacenter.iter().map(|dc| {
                vec![
                    dc.name.clone(),
                    dc.clocks.to_string(),
                    dc.final_metric
                        .map_or("-".to_owned(), |m| format!("{m:.4}")),
                    dc.time_to_target_seconds
                        .map_or("-".to_owned(), |s| format!("{s:.1} s")),
                ]
            });
            let header = vec![
                "datacenter".to_owned(),
                "clocks".to_owned(),
                self.metric_name.clone(),
                "to target".to_owned(),
            ];
            let _ = writeln!(t, "\n{}", table(header, rows));
        }
        t
    }
}

/// `rows` under `header` as a Markdown table (it pastes into the docs), the
/// first column left-aligned, the others (numbers) right-aligned.
pub(crate) fn table(header: Vec<String>, rows: impl IntoIterator<Item = Vec<String>>) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::ASCII_MARKDOWN)
        .set_header(header)
        .add_rows(rows);
    for column in table.column_iter_mut().skip(1) {
        column.set_cell_alignment(CellAlignment::Right);
    }
    table
}

/// `1234567` as `1.2 MB`.
#[must_use]
pub fn human_bytes(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // for display only
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// What a Collaborative run adds to a `geoml run` report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CollaborativeTotals {
    /// Mean over drift events of the batches until accuracy is back within
    /// 2 points of its pre-drift level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptation_batches: Option<f64>,
    /// Model bytes per site.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_bytes: Option<u64>,
    /// Seconds spent training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_seconds: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(from: &str, to: &str, bytes: u64) -> LinkBytes {
        LinkBytes {
            from: from.to_owned(),
            to: to.to_owned(),
            bytes,
        }
    }

    #[test]
    #[allow(clippy::float_cmp)] // exact binary fractions
    fn settled_rates_leave_out_the_first_fifth_of_training() {
        let samples = vec![
            (0.0, vec![link("a", "b", 0)]),
            (1.0, vec![link("a", "b", 1000)]),
            (2.0, vec![link("a", "b", 1500)]),
            (5.0, vec![link("a", "b", 3000)]),
        ];
        // Settled from 1 s (a fifth of 5 s): 2000 bytes in 4 s.
        let rates = settled_rates(&samples, |_, _| Some(400.0));
        assert_eq!(
            rates,
            vec![LinkRate {
                from: "a".into(),
                to: "b".into(),
                settled_bytes_per_second: 500.0,
                budget_bytes_per_second: Some(400.0),
            }]
        );
        assert!(settled_rates(&samples[..1], |_, _| None).is_empty());
    }

    #[test]
    fn bytes_at_interpolates_between_samples_and_takes_the_total_after_them() {
        let samples = vec![
            (1.0, vec![link("a", "b", 600), link("b", "a", 400)]),
            (2.0, vec![link("a", "b", 1500), link("b", "a", 500)]),
        ];
        let total = [link("a", "b", 5000), link("b", "a", 4000)];
        assert_eq!(bytes_at(&samples, 0.5, &total), 500);
        assert_eq!(bytes_at(&samples, 1.0, &total), 1000);
        assert_eq!(bytes_at(&samples, 1.25, &total), 1250);
        assert_eq!(bytes_at(&samples, 2.5, &total), 9000);
        assert_eq!(bytes_at(&[], 1.0, &total), 9000);
    }
}
