//! `geoml compare`: one job under several modes, one after the other on this
//! machine; a ratio table, a JSON file with every run's report, and a plot
//! of the metric over time per mode.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use geoml_crds::sync_policy::InterDatacenterModel;
use serde::Serialize;
use serde_yaml::Value;

use geoml_crds::mode::Mode;

use crate::error::RunError;
use crate::options::RunOptions;
use crate::report::{Report, human_bytes};
use crate::run::run;

/// Staleness naive WAN SSP runs with when the SyncPolicy gives none.
const DEFAULT_WAN_STALENESS: i64 = 3;

/// `manifest` (multi-document YAML) with every SyncPolicy's inter-datacenter
/// model set to `model`, and with `full_budget`, the TrainingJob's target
/// metric removed (returned, for measuring time to target).
pub fn with_mode(
    manifest: &str,
    model: InterDatacenterModel,
    full_budget: bool,
) -> Result<(String, Option<f64>), RunError> {
    let model_value = serde_yaml::to_value(model)?;
    let mut out = Vec::new();
    let mut target = None;
    for document in serde_yaml::Deserializer::from_str(manifest) {
        let mut doc: Value = serde::Deserialize::deserialize(document)?;
        if full_budget
            && doc["kind"].as_str() == Some("TrainingJob")
            && let Some(stopping) = doc
                .get_mut("spec")
                .and_then(|s| s.get_mut("stopping"))
                .and_then(Value::as_mapping_mut)
        {
            target = stopping.remove("targetMetric").and_then(|t| t.as_f64());
        }
        if doc["kind"].as_str() == Some("SyncPolicy") {
            let spec = doc
                .as_mapping_mut()
                .and_then(|d| d.get_mut("spec"))
                .and_then(Value::as_mapping_mut)
                .ok_or(RunError::SyncPolicyWithoutSpec)?;
            let inter = spec
                .entry("interDatacenter".into())
                .or_insert_with(|| Value::Mapping(serde_yaml::Mapping::new()));
            inter["model"] = model_value.clone();
            if model == InterDatacenterModel::Ssp && inter.get("staleness").is_none() {
                inter["staleness"] = DEFAULT_WAN_STALENESS.into();
            }
        }
        out.push(serde_yaml::to_string(&doc)?);
    }
    Ok((out.join("---\n"), target))
}

/// What `--json` holds.
#[derive(Serialize)]
pub struct Comparison {
    /// The job.
    pub job: String,
    /// Each mode's `geoml run` report, by mode name.
    pub modes: BTreeMap<String, Report>,
    /// The modes in the order they ran.
    pub order: Vec<String>,
}

/// Runs the job in `options.manifest` once per mode; each run gets its own
/// directory `options.work_dir/<mode>` with its manifest, topology files and
/// logs.
pub async fn compare(
    options: &RunOptions,
    modes: &[Mode],
    full_budget: bool,
) -> Result<Comparison, RunError> {
    let text = std::fs::read_to_string(&options.manifest).map_err(|source| RunError::Io {
        context: format!("reading {}", options.manifest.display()),
        source,
    })?;
    let mut comparison = Comparison {
        job: String::new(),
        modes: BTreeMap::new(),
        order: Vec::new(),
    };
    for &mode in modes {
        let name = mode.name();
        let dir = options.work_dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|source| RunError::Io {
            context: format!("creating {}", dir.display()),
            source,
        })?;
        let manifest = dir.join("manifest.yaml");
        let (patched, target) = with_mode(&text, mode.model(), full_budget)?;
        std::fs::write(&manifest, patched).map_err(|source| RunError::Io {
            context: format!("writing {}", manifest.display()),
            source,
        })?;
        if options.progress {
            eprintln!("== {name}");
        }
        let report = run(RunOptions {
            manifest,
            work_dir: dir,
            target,
            ..options.clone()
        })
        .await?;
        comparison.job.clone_from(&report.job);
        comparison.order.push(name.to_owned());
        comparison.modes.insert(name.to_owned(), report);
    }
    Ok(comparison)
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "-".to_owned()
    }
}

impl Comparison {
    fn ordered(&self) -> impl Iterator<Item = &Report> {
        self.order.iter().filter_map(|m| self.modes.get(m))
    }

    /// The ratio table: time to target and final metric against the first
    /// mode, WAN bytes against naive WAN BSP (or the first mode that used
    /// the WAN).
    #[must_use]
    pub fn table(&self) -> String {
        let Some(first) = self.ordered().next() else {
            return String::new();
        };
        let wan_base = self
            .modes
            .get("bsp-wan")
            .or_else(|| self.ordered().find(|r| r.wan_bytes_total > 0));
        let mut t = String::new();
        let _ = writeln!(
            t,
            "{:<12} {:>12} {:>9} {:>9} {:>8} {:>11} {:>10}",
            "mode",
            "to target",
            format!("÷{}", first.mode),
            first.metric_name,
            "Δ pts",
            "WAN bytes",
            format!("÷{}", wan_base.map_or("-", |r| r.mode.as_str())),
        );
        #[allow(clippy::cast_precision_loss)] // byte counts, for display
        for r in self.ordered() {
            let to_target = r.time_to_target_seconds.map_or_else(
                || format!("> {:.1} s", r.wall_seconds),
                |s| format!("{s:.1} s"),
            );
            let vs_first = match (r.time_to_target_seconds, first.time_to_target_seconds) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".to_owned(),
            };
            let metric = r.final_metric.map_or("-".to_owned(), |m| format!("{m:.4}"));
            let delta = match (r.final_metric, first.final_metric) {
                (Some(a), Some(b)) => format!("{:+.2}", 100.0 * (a - b)),
                _ => "-".to_owned(),
            };
            let wan_ratio = wan_base.map_or("-".to_owned(), |b| {
                if r.wan_bytes_total == 0 {
                    "0".to_owned()
                } else {
                    ratio(r.wan_bytes_total as f64, b.wan_bytes_total as f64)
                }
            });
            let _ = writeln!(
                t,
                "{:<12} {:>12} {:>9} {:>9} {:>8} {:>11} {:>10}",
                r.mode,
                to_target,
                vs_first,
                metric,
                delta,
                human_bytes(r.wan_bytes_total),
                wan_ratio
            );
        }
        t
    }

    /// An SVG plot of each mode's metric over time (its first datacenter's model).
    #[must_use]
    pub fn svg(&self) -> String {
        const W: f64 = 720.0;
        const H: f64 = 420.0;
        const LEFT: f64 = 60.0;
        const RIGHT: f64 = 150.0;
        const TOP: f64 = 20.0;
        const BOTTOM: f64 = 40.0;
        const COLOURS: [&str; 8] = [
            "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        ];
        let points: Vec<(f64, f64)> = self
            .ordered()
            .flat_map(|r| r.metric_history.iter().map(|s| (s.seconds, s.metric)))
            .collect();
        let x_max = points.iter().map(|p| p.0).fold(1.0_f64, f64::max);
        let (y_min, y_max) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
        let (y_min, y_max) = if y_min < y_max {
            (y_min, y_max)
        } else {
            (0.0, 1.0)
        };
        let x = |s: f64| LEFT + (W - LEFT - RIGHT) * s / x_max;
        let y = |m: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (m - y_min) / (y_max - y_min));
        let metric = self
            .ordered()
            .next()
            .map_or("metric", |r| r.metric_name.as_str());
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<path d="M{LEFT},{TOP} V{} H{}" fill="none" stroke="black"/>"#,
            H - BOTTOM,
            W - RIGHT
        );
        for i in 0..=4 {
            let v = y_min + (y_max - y_min) * f64::from(i) / 4.0;
            let s = x_max * f64::from(i) / 4.0;
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{v:.3}</text><text x="{}" y="{}" text-anchor="middle">{s:.0}</text>"#,
                LEFT - 5.0,
                y(v) + 4.0,
                x(s),
                H - BOTTOM + 16.0
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">seconds since training started</text><text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">{metric}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 5.0,
            H / 2.0,
            H / 2.0
        );
        for (i, r) in self.ordered().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let path: Vec<String> = r
                .metric_history
                .iter()
                .map(|s| format!("{:.1},{:.1}", x(s.seconds), y(s.metric)))
                .collect();
            if !path.is_empty() {
                let _ = writeln!(
                    svg,
                    r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
                    path.join(" ")
                );
            }
            #[allow(clippy::cast_precision_loss)] // a handful of modes
            let ly = TOP + 18.0 * i as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                W - RIGHT + 10.0,
                W - RIGHT + 30.0,
                W - RIGHT + 35.0,
                ly + 4.0,
                r.mode
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    /// Writes the JSON file.
    pub fn write_json(&self, path: &Path) -> Result<(), RunError> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|source| RunError::Io {
            context: format!("writing {}", path.display()),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_mode_of_every_sync_policy() {
        let manifest = "apiVersion: geoml.io/v1alpha1\nkind: SyncPolicy\nmetadata: {name: p}\nspec:\n  interDatacenter: {model: ASP}\n---\nkind: TrainingJob\nspec: {stopping: {targetMetric: 0.8, maxClocks: 9}}\n";
        let (text, target) = with_mode(manifest, InterDatacenterModel::Ssp, false).unwrap();
        assert!(text.contains("model: SSP"), "{text}");
        assert!(text.contains("staleness: 3"), "{text}");
        assert!(text.contains("targetMetric: 0.8"), "{text}");
        assert_eq!(target, None);
        let (text, target) = with_mode(manifest, InterDatacenterModel::FedAvg, true).unwrap();
        assert!(text.contains("model: FedAvg"), "{text}");
        assert!(!text.contains("targetMetric"), "{text}");
        assert!(text.contains("maxClocks: 9"), "{text}");
        assert_eq!(target, Some(0.8));
    }
}
