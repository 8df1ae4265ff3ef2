//! `geoml compare`: one job under several modes, one after the other on this
//! machine; a ratio table, a JSON file with every run's report, and a plot
//! of the metric over time per mode.

use std::collections::BTreeMap;
use std::path::Path;

use geoml_crds::sync_policy::InterDatacenterModel;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

use geoml_crds::manifest::{Manifest, ManifestError};
use geoml_crds::mode::Mode;

use crate::error::RunError;
use crate::options::RunOptions;
use crate::report::{Report, human_bytes, table};
use crate::run::run;

/// Line colours of the plot, one per mode (readable on white).
const COLOURS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

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
    let mut documents = geoml_crds::yaml::documents(manifest).map_err(ManifestError::Yaml)?;
    let mut target = None;
    for doc in &mut documents {
        if full_budget
            && doc["kind"] == "TrainingJob"
            && let Some(stopping) = doc
                .pointer_mut("/spec/stopping")
                .and_then(Value::as_object_mut)
        {
            target = stopping.remove("targetMetric").and_then(|t| t.as_f64());
        }
        if doc["kind"] == "SyncPolicy" {
            let spec = doc
                .get_mut("spec")
                .and_then(Value::as_object_mut)
                .ok_or(RunError::SyncPolicyWithoutSpec)?;
            let inter = spec.entry("interDatacenter").or_insert_with(|| json!({}));
            inter["model"] = json!(model);
            if model == InterDatacenterModel::Ssp && inter.get("staleness").is_none() {
                inter["staleness"] = DEFAULT_WAN_STALENESS.into();
            }
        }
    }
    Ok((geoml_crds::yaml::to_stream(&documents)?, target))
}

/// What `--json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The job.
    pub job: String,
    /// Each mode's `geoml run` report, by mode name.
    pub modes: BTreeMap<String, Report>,
    /// The modes in the order they ran.
    pub order: Vec<String>,
}

/// Runs the job in `options.manifest` once per mode (see [`run_mode`]).
pub async fn compare(
    options: &RunOptions,
    modes: &[Mode],
    full_budget: bool,
) -> Result<Comparison, RunError> {
    let text = std::fs::read_to_string(&options.manifest).map_err(|source| RunError::Io {
        context: format!("reading {}", options.manifest.display()),
        source,
    })?;
    // Checked once, before any mode runs: a manifest the roles would refuse
    // is refused here, and the per-mode copies edit a well-formed one.
    Manifest::from_yaml(&text)?.job()?;
    let mut comparison = Comparison {
        job: String::new(),
        modes: BTreeMap::new(),
        order: Vec::new(),
    };
    for &mode in modes {
        let report = run_mode(options, &text, mode, full_budget).await?;
        comparison.job.clone_from(&report.job);
        comparison.order.push(mode.name().to_owned());
        comparison.modes.insert(mode.name().to_owned(), report);
    }
    Ok(comparison)
}

/// Runs the job of manifest `text` once under `mode`, in its own directory
/// `options.work_dir/<mode>` with its manifest, topology files and logs.
pub async fn run_mode(
    options: &RunOptions,
    text: &str,
    mode: Mode,
    full_budget: bool,
) -> Result<Report, RunError> {
    let name = mode.name();
    let dir = options.work_dir.join(name);
    std::fs::create_dir_all(&dir).map_err(|source| RunError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    let manifest = dir.join("manifest.yaml");
    let (patched, target) = with_mode(text, mode.model(), full_budget)?;
    std::fs::write(&manifest, patched).map_err(|source| RunError::Io {
        context: format!("writing {}", manifest.display()),
        source,
    })?;
    if options.progress {
        eprintln!("== {name}");
    }
    run(RunOptions {
        manifest,
        work_dir: dir,
        target,
        ..options.clone()
    })
    .await
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
        let header = vec![
            "mode".to_owned(),
            "to target".to_owned(),
            format!("÷{}", first.mode),
            first.metric_name.clone(),
            "Δ pts".to_owned(),
            "WAN bytes".to_owned(),
            format!("÷{}", wan_base.map_or("-", |r| r.mode.as_str())),
        ];
        #[allow(clippy::cast_precision_loss)] // byte counts, for display
        let rows = self.ordered().map(|r| {
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
            vec![
                r.mode.clone(),
                to_target,
                vs_first,
                metric,
                delta,
                human_bytes(r.wan_bytes_total),
                wan_ratio,
            ]
        });
        format!("{}\n", table(header, rows))
    }

    /// An SVG plot of each mode's metric over time (its first datacenter's model).
    pub fn svg(&self) -> Result<String, RunError> {
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
        let metric = self
            .ordered()
            .next()
            .map_or("metric", |r| r.metric_name.as_str());
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (720, 420)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(0.0..x_max, y_min..y_max)?;
            chart
                .configure_mesh()
                .light_line_style(RGBColor(235, 235, 235))
                .label_style(("sans-serif", 12))
                .x_desc("seconds since training started")
                .y_desc(metric)
                .y_label_formatter(&|v| format!("{v:.3}"))
                .draw()?;
            for (i, r) in self.ordered().enumerate() {
                let colour = COLOURS[i % COLOURS.len()];
                chart
                    .draw_series(LineSeries::new(
                        r.metric_history.iter().map(|s| (s.seconds, s.metric)),
                        colour.stroke_width(2),
                    ))?
                    .label(r.mode.clone())
                    // A swatch, so the plot holds one line per mode.
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 2), (x + 16, y + 2)], colour.filled())
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(RGBColor(200, 200, 200))
                .label_font(("sans-serif", 12))
                .draw()?;
            root.present()?;
        }
        Ok(svg)
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
