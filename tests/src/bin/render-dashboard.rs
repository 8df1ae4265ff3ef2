//! `render-dashboard`: draws a Grafana dashboard's panels from a Prometheus
//! server into one SVG (plotters), so that a person can see a run's sync
//! traffic without Grafana.
//!
//! Each panel's queries run as range queries with the dashboard's template
//! variables substituted (`--var name=value`; a textbox variable defaults to
//! its value, a query variable to `.*`); time series are drawn as lines with
//! their legends, stat panels as their last values.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Parser;
use geoml_tests::prometheus;
use plotters::prelude::*;
use serde_json::Value;

/// Renders a dashboard's panels from a Prometheus server into an SVG.
#[derive(Parser, Debug)]
struct Args {
    /// The Prometheus server, `ip:port`.
    #[arg(long)]
    prometheus: SocketAddr,
    /// The dashboard JSON (e.g. charts/geoml/dashboards/sync-traffic.json).
    #[arg(long)]
    dashboard: PathBuf,
    /// Where to write the SVG.
    #[arg(long)]
    out: PathBuf,
    /// A template variable, `name=value` (repeatable).
    #[arg(long = "var", value_parser = parse_var)]
    vars: Vec<(String, String)>,
    /// Start of the range, Unix seconds; default `--minutes` before the end.
    #[arg(long)]
    start: Option<f64>,
    /// End of the range, Unix seconds; default now.
    #[arg(long)]
    end: Option<f64>,
    /// Length of the range when `--start` is not given.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds between points; default the range over 240.
    #[arg(long)]
    step: Option<f64>,
    /// What `$__rate_interval` stands for.
    #[arg(long, default_value = "30s")]
    rate_interval: String,
    /// Panel types to draw (`timeseries`, `stat`).
    #[arg(long, value_delimiter = ',', default_value = "timeseries,stat")]
    types: Vec<String>,
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

/// One series of a range query: its legend and points (seconds since the
/// start, value).
struct Series {
    legend: String,
    points: Vec<(f64, f64)>,
}

/// A panel with the data of its queries.
struct Panel {
    title: String,
    kind: String,
    unit: String,
    series: Vec<Series>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.dashboard)
        .with_context(|| format!("reading {}", args.dashboard.display()))?;
    let dashboard: Value = serde_json::from_str(&text).context("parsing the dashboard")?;
    let end = match args.end {
        Some(end) => end,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64(),
    };
    let start = args.start.unwrap_or(end - args.minutes * 60.0);
    if start >= end {
        bail!("the range is empty: start {start} ≥ end {end}");
    }
    let step = args.step.unwrap_or(((end - start) / 240.0).max(1.0));
    let vars = variables(&dashboard, &args, end - start, step);
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let kind = panel["type"].as_str().unwrap_or_default();
        if !args.types.iter().any(|t| t == kind) {
            continue;
        }
        let mut series = Vec::new();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = prometheus::substitute(target["expr"].as_str().unwrap_or_default(), &vars);
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            series.extend(
                query_range(args.prometheus, &expr, start, end, step)
                    .await
                    .with_context(|| format!("querying {expr}"))?
                    .into_iter()
                    .map(|(labels, points)| Series {
                        legend: legend_of(legend, &labels, &expr),
                        points: points.into_iter().map(|(t, v)| (t - start, v)).collect(),
                    }),
            );
        }
        panels.push(Panel {
            title: panel["title"].as_str().unwrap_or_default().to_owned(),
            kind: kind.to_owned(),
            unit: panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            series,
        });
    }
    let title = dashboard["title"].as_str().unwrap_or("dashboard");
    draw(&args.out, title, &panels, end - start)?;
    let drawn: usize = panels.iter().map(|p| p.series.len()).sum();
    eprintln!(
        "{}: {} panels, {drawn} series, {:.0} s from {start:.0}",
        args.out.display(),
        panels.len(),
        end - start
    );
    Ok(())
}

/// The dashboard's variables with their values: `--var`, else a textbox's
/// default, else `.*`; and Grafana's built-ins for the range.
fn variables(dashboard: &Value, args: &Args, range: f64, step: f64) -> Vec<(String, String)> {
    let given: BTreeMap<_, _> = args.vars.iter().cloned().collect();
    let mut vars: Vec<(String, String)> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let name = v["name"].as_str()?.to_owned();
            let value = given.get(&name).cloned().unwrap_or_else(|| {
                if v["type"] == "textbox" {
                    v["query"].as_str().unwrap_or_default().to_owned()
                } else {
                    ".*".to_owned()
                }
            });
            Some((name, value))
        })
        .collect();
    vars.push(("__rate_interval".into(), args.rate_interval.clone()));
    vars.push(("__range".into(), format!("{}s", range.ceil())));
    vars.push(("__interval".into(), format!("{}s", step.ceil())));
    vars
}

/// `format` with every `{{label}}` replaced by the series' label.
fn legend_of(format: &str, labels: &BTreeMap<String, String>, expr: &str) -> String {
    if format.is_empty() {
        return expr.to_owned();
    }
    let mut out = format.to_owned();
    while let Some(open) = out.find("{{") {
        let Some(len) = out[open..].find("}}") else {
            break;
        };
        let name = out[open + 2..open + len].trim().to_owned();
        let value = labels.get(&name).cloned().unwrap_or_default();
        out.replace_range(open..open + len + 2, &value);
    }
    out
}

type Labels = BTreeMap<String, String>;
/// Points of one series: (Unix seconds, value).
type Points = Vec<(f64, f64)>;

/// The result of a range query: each series' labels and points.
async fn query_range(
    prometheus: SocketAddr,
    expr: &str,
    start: f64,
    end: f64,
    step: f64,
) -> anyhow::Result<Vec<(Labels, Points)>> {
    let (start, end, step) = (start.to_string(), end.to_string(), step.to_string());
    let params = [
        ("query", expr),
        ("start", &start),
        ("end", &end),
        ("step", &step),
    ];
    let data = prometheus::api(prometheus, "/api/v1/query_range", &params).await?;
    let mut out = Vec::new();
    for series in data["result"].as_array().into_iter().flatten() {
        let labels = series["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        let points = series["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let t = p[0].as_f64()?;
                let v: f64 = p[1].as_str()?.parse().ok()?;
                v.is_finite().then_some((t, v))
            })
            .collect();
        out.push((labels, points));
    }
    Ok(out)
}

/// `value` in the panel's unit, short.
fn human(value: f64, unit: &str) -> String {
    let scaled = |v: f64, base: f64, suffixes: &[&str]| {
        let mut v = v;
        let mut i = 0;
        while v.abs() >= base && i + 1 < suffixes.len() {
            v /= base;
            i += 1;
        }
        let text = format!("{v:.2}");
        let text = if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.')
        } else {
            &text
        };
        format!("{text}{}", suffixes[i])
    };
    match unit {
        "bytes" => scaled(value, 1024.0, &[" B", " KiB", " MiB", " GiB", " TiB"]),
        "Bps" => scaled(value, 1024.0, &[" B/s", " KiB/s", " MiB/s", " GiB/s"]),
        "percentunit" => format!("{:.1}%", value * 100.0),
        "currencyUSD" if value.abs() < 0.01 && value != 0.0 => format!("${value:.2e}"),
        "currencyUSD" => format!("${value:.2}"),
        "s" if value.abs() < 1.0 && value != 0.0 => format!("{:.1} ms", value * 1e3),
        "s" => format!("{value:.2} s"),
        "reqps" | "ops" => format!("{value:.2}/s"),
        _ => scaled(value, 1000.0, &["", "k", "M", "G", "T"]),
    }
}

const COLUMNS: usize = 2;
const PANEL_WIDTH: u32 = 640;
const PANEL_HEIGHT: u32 = 300;
const HEADER: u32 = 40;

fn draw(out: &PathBuf, title: &str, panels: &[Panel], range: f64) -> anyhow::Result<()> {
    let rows = panels.len().div_ceil(COLUMNS).max(1);
    let width = PANEL_WIDTH * u32::try_from(COLUMNS)?;
    let height = HEADER + PANEL_HEIGHT * u32::try_from(rows)?;
    let root = SVGBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(HEADER);
    header.titled(title, ("sans-serif", 22))?;
    let areas = body.split_evenly((rows, COLUMNS));
    for (panel, area) in panels.iter().zip(areas) {
        if panel.kind == "stat" {
            draw_stat(panel, &area)?;
        } else {
            draw_timeseries(panel, &area, range)?;
        }
    }
    root.present()?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_stat(panel: &Panel, area: &Area<'_>) -> anyhow::Result<()> {
    let area = area.margin(8, 8, 8, 8);
    area.draw(&Rectangle::new(
        [(0, 0), (i32::try_from(PANEL_WIDTH)? - 16, 30)],
        RGBColor(240, 240, 240).filled(),
    ))?;
    area.draw(&Text::new(
        panel.title.clone(),
        (8, 8),
        ("sans-serif", 16).into_font(),
    ))?;
    for (i, s) in panel.series.iter().enumerate() {
        let value = s
            .points
            .last()
            .map_or_else(|| "no data".to_owned(), |p| human(p.1, &panel.unit));
        let y = 50 + 28 * i32::try_from(i)?;
        area.draw(&Text::new(
            format!("{}: {value}", s.legend),
            (16, y),
            ("sans-serif", 18).into_font().color(&Palette99::pick(i)),
        ))?;
    }
    Ok(())
}

fn draw_timeseries(panel: &Panel, area: &Area<'_>, range: f64) -> anyhow::Result<()> {
    let values = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    let (low, high) = if low.is_finite() {
        let low = low.min(0.0);
        let pad = ((high - low) * 0.05).max(1e-9);
        (low, high + pad)
    } else {
        (0.0, 1.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..range, low..high)?;
    let unit = panel.unit.clone();
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_labels(6)
        .y_labels(5)
        .x_label_formatter(&|t| format!("{t:.0} s"))
        .y_label_formatter(&|v| human(*v, &unit))
        .draw()?;
    for (i, s) in panel.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.legend.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    if panel.series.is_empty() {
        chart.draw_series(std::iter::once(Text::new(
            "no data",
            (range / 2.0, f64::midpoint(low, high)),
            ("sans-serif", 16).into_font(),
        )))?;
    } else {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 12))
            .draw()?;
    }
    Ok(())
}
