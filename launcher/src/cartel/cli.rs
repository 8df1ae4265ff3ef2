//! `geoml cartel-bench`: every mode of Collaborative jobs, with Cartel's ratios.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::harness::CartelSummary;
use crate::error::{RunError, io};
use crate::options::RunOptions;
use crate::report::human_bytes;
use geoml_crds::mode::CollaborativeMode;

/// `geoml cartel-bench`: every mode on each manifest, in one run, with ratios.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Manifests of Collaborative jobs.
    #[arg(required = true)]
    pub manifests: Vec<PathBuf>,
    /// Modes to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cartel,isolated,centralized,global"
    )]
    pub modes: Vec<CollaborativeMode>,
    /// Write every summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where logs go [default: a temporary directory].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where data sets are cached.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run the roles without TLS (logged loudly); by default a throwaway
    /// CA gives every role a certificate and they use mTLS.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// Runs the benchmark and returns its table.
pub async fn bench(args: BenchArgs) -> Result<String, RunError> {
    let temp = tempfile::Builder::new()
        .prefix("geoml-cartel-bench-")
        .tempdir()
        .map_err(io("creating a temporary directory"))?;
    let root = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let mut all = Vec::new();
    let mut out = String::new();
    for (i, manifest) in args.manifests.iter().enumerate() {
        let mut summaries: Vec<CartelSummary> = Vec::new();
        for &mode in &args.modes {
            let options = RunOptions {
                geoml: std::env::current_exe().map_err(io("finding geoml"))?,
                manifest: manifest.clone(),
                work_dir: root.join(format!("{i}-{}", mode.name())),
                data_dir: args
                    .data_dir
                    .clone()
                    .unwrap_or_else(geoml_dataplane::data::default_cache_dir),
                eval_every: geoml_crds::roles::DEFAULT_EVAL_EVERY,
                progress: false,
                target: None,
                wan_control: None,
                faults: Vec::new(),
                seed: geoml_crds::roles::DEFAULT_SEED,
                insecure_plaintext: args.insecure_plaintext,
            };
            let (_, summary, _) = super::run_detailed(&options, mode).await?;
            summaries.push(summary);
        }
        out.push_str(&table(&manifest.display().to_string(), &summaries));
        all.extend(summaries);
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&all)?;
        std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))?;
    }
    Ok(out)
}

/// One manifest's summaries as a table, with Cartel's ratios to the baselines.
#[must_use]
pub fn table(title: &str, summaries: &[CartelSummary]) -> String {
    let mut t = String::new();
    let scenario = summaries.first().map_or("", |s| s.scenario.as_str());
    let _ = writeln!(t, "{title} ({scenario})");
    let _ = writeln!(
        t,
        "{:<12} {:>9} {:>9} {:>11} {:>12} {:>11} {:>10} {:>8} {:>9}",
        "mode",
        "acc_end",
        "acc_mean",
        "adapt_bat",
        "wan_bytes",
        "model_B",
        "train_s",
        "detects",
        "borrows"
    );
    for s in summaries {
        let _ = writeln!(
            t,
            "{:<12} {:>9.4} {:>9.4} {:>11} {:>12} {:>11} {:>10.3} {:>8} {:>9}",
            s.mode,
            s.accuracy_final,
            s.accuracy_mean,
            s.adaptation_batches
                .map_or("-".to_owned(), |a| format!("{a:.1}")),
            human_bytes(s.wan_bytes_total),
            s.model_bytes,
            s.training_seconds,
            s.detections,
            s.transfers,
        );
    }
    let find = |m: &str| summaries.iter().find(|s| s.mode == m);
    if let Some(cartel) = find("cartel") {
        #[allow(clippy::cast_precision_loss)] // ratios for display
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.1}x", a / b)
            } else {
                "-".to_owned()
            }
        };
        if let Some(iso) = find("isolated") {
            let _ = writeln!(
                t,
                "adaptation: isolated/cartel = {}",
                ratio(
                    iso.adaptation_batches.unwrap_or(0.0),
                    cartel.adaptation_batches.unwrap_or(0.0)
                )
            );
        }
        if let Some(c) = find("centralized") {
            #[allow(clippy::cast_precision_loss)] // ratios for display
            let _ = writeln!(
                t,
                "centralized/cartel: bytes moved {}, model size {}, training time {}; accuracy cartel - centralized = {:+.4}",
                ratio(c.wan_bytes_total as f64, cartel.wan_bytes_total as f64),
                ratio(c.model_bytes as f64, cartel.model_bytes as f64),
                ratio(c.training_seconds, cartel.training_seconds),
                cartel.accuracy_final - c.accuracy_final,
            );
        }
    }
    t
}
