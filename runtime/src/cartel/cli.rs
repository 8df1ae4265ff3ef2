//! The `geoml registry`, `geoml site` and `geoml cartel-bench` subcommands.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use geoml_crds::topology::Topology;

use super::harness::CartelSummary;
use super::scenario::Scenario;
use super::site::{FinishWait, Links, run_site};
use super::{CartelError, Mode, SiteConfig, registry};
use crate::manifest::Manifest;
use crate::run::{RunOptions, human_bytes};

/// `geoml registry`: Cartel's metadata service.
#[derive(clap::Args, Debug)]
pub struct RegistryArgs {
    /// Address to serve gRPC on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Keep the registry's state here; a restarted registry reloads it.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// gRPC URLs of registry replicas to forward every update to, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// Exit 0 on its own once this many distinct sites (the job's
    /// datacenters) said their stream ended, after --exit-grace. Without it
    /// the registry serves until SIGTERM.
    #[arg(long, value_name = "SITES")]
    pub exit_when_finished: Option<usize>,
    /// With --exit-when-finished: seconds to keep answering once every site
    /// finished, so that each reads that all are done.
    #[arg(long, value_name = "SECONDS", default_value_t = registry::DEFAULT_EXIT_GRACE.as_secs_f64())]
    pub exit_grace: f64,
}

/// Serves the registry until `shutdown` completes or, with
/// `--exit-when-finished`, until every site finished.
pub async fn registry(
    args: RegistryArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CartelError> {
    let exit = match args.exit_when_finished {
        None => None,
        Some(0) => {
            return Err(CartelError::Unsupported(
                "--exit-when-finished needs at least one site".into(),
            ));
        }
        Some(sites) => Some(registry::ExitWhenFinished {
            sites,
            grace: seconds("--exit-grace", args.exit_grace)?,
        }),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(CartelError::io(format!("binding {}", args.listen)))?;
    let replicas = args
        .replicas
        .into_iter()
        .filter(|r| !r.is_empty())
        .collect();
    registry::serve(
        listener,
        args.state_dir.as_deref(),
        replicas,
        exit,
        shutdown,
    )
    .await
}

/// A duration given in seconds on the command line.
fn seconds(flag: &str, value: f64) -> Result<std::time::Duration, CartelError> {
    std::time::Duration::try_from_secs_f64(value)
        .map_err(|e| CartelError::Unsupported(format!("{flag} {value}: {e}")))
}

/// `geoml site`: one site of a Collaborative job.
#[derive(clap::Args, Debug)]
pub struct SiteArgs {
    /// The manifest holding the TrainingJob.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Where data sets are cached.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Never fetch: a data set missing from --data-dir is an error (fill the
    /// directory with `geoml data fetch`; see docs/data.md).
    #[arg(long)]
    pub no_fetch: bool,
    /// The topology file; gives the site (its datacenter) and the registry URL.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// The site: a datacenter of the job [default: the topology's datacenter].
    #[arg(long)]
    pub site: Option<String>,
    /// Address to serve the model exchange on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// URL other sites reach this site at, e.g. through a WAN proxy [default: http://LISTEN].
    #[arg(long)]
    pub advertise: Option<String>,
    /// The registry's gRPC URL [default: the topology's registry].
    #[arg(long)]
    pub registry: Option<String>,
    /// `cartel` (borrow from neighbours on drift) or `isolated`.
    #[arg(long, value_enum, default_value = "cartel")]
    pub mode: Mode,
    /// Detect drift with ADWIN instead of the window W / limit L rule.
    #[arg(long)]
    pub adwin: bool,
    /// Start training only once the registry knows this many sites (the
    /// job's datacenters); after the stream, wait for this many to finish
    /// [default 0: start at once, and wait for every site the registry knows].
    #[arg(long, default_value_t = 0)]
    pub expect_sites: usize,
    /// Write the site's report (JSON) here when its stream ends.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Once the stream ended: seconds between asking the registry whether
    /// every site finished.
    #[arg(long, value_name = "SECONDS", default_value_t = FinishWait::default().poll.as_secs_f64())]
    pub finish_poll: f64,
    /// Once the stream ended: seconds the registry may be unreachable before
    /// the site takes it to have exited (it does once every site finished)
    /// and exits 0.
    #[arg(long, value_name = "SECONDS", default_value_t = FinishWait::default().registry_grace.as_secs_f64())]
    pub registry_grace: f64,
    /// Once the stream ended: seconds to wait for every site to finish
    /// before failing.
    #[arg(long, value_name = "SECONDS", default_value_t = FinishWait::default().timeout.as_secs_f64())]
    pub finish_timeout: f64,
}

/// Runs one site. In the Collaborative mode it tells the registry when its
/// stream ended and keeps serving its model exchange until the registry
/// says every site finished (or stays unreachable for --registry-grace),
/// then returns; in the isolated mode it returns at the end of its stream.
/// `shutdown` stops it early.
pub async fn site(
    args: SiteArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CartelError> {
    let topology = match &args.topology {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(CartelError::io(format!("reading {}", path.display())))?;
            Some(
                Topology::from_yaml(&text)
                    .map_err(|e| CartelError::Protocol(format!("{}: {e}", path.display())))?,
            )
        }
        None => None,
    };
    let site = args
        .site
        .clone()
        .or_else(|| topology.as_ref().map(|t| t.datacenter.clone()))
        .ok_or_else(|| CartelError::Unsupported("give --site or --topology".into()))?;
    let manifest = Manifest::load(&args.manifest)?;
    let job = manifest.job()?;
    let spec = &job.job.spec;
    let mut config = SiteConfig::from_job(spec, &job.sync_policy.spec.collaborative)?;
    config.adwin = args.adwin;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(crate::data::default_cache_dir);
    if args.no_fetch {
        crate::data::require_cached(spec.dataset.name, &data_dir)?;
    }
    let scenario = Scenario::build(spec, &data_dir)?;
    let index = scenario
        .sites
        .iter()
        .position(|s| s.name == site)
        .ok_or_else(|| {
            CartelError::Unsupported(format!("{site:?} is not a datacenter of the job"))
        })?;
    let links = Links {
        registry: args
            .registry
            .clone()
            .or_else(|| topology.and_then(|t| t.registry)),
        advertise: args
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", args.listen)),
        expect_sites: args.expect_sites,
        finish: FinishWait {
            poll: seconds("--finish-poll", args.finish_poll)?,
            registry_grace: seconds("--registry-grace", args.registry_grace)?,
            timeout: seconds("--finish-timeout", args.finish_timeout)?,
        },
    };
    if args.mode == Mode::Cartel && links.registry.is_none() {
        return Err(CartelError::Unsupported(
            "mode cartel needs --registry or a topology with a registry".into(),
        ));
    }
    if !matches!(args.mode, Mode::Cartel | Mode::Isolated) {
        return Err(CartelError::Unsupported(format!(
            "geoml site runs modes cartel and isolated, not {}",
            args.mode.name()
        )));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(CartelError::io(format!("binding {}", args.listen)))?;
    let report = run_site(
        &scenario,
        index,
        config,
        args.mode,
        &links,
        listener,
        args.report.as_deref(),
        shutdown,
    )
    .await?;
    tracing::info!(
        site,
        detections = report.detections.len(),
        transfers = report.transfers.len(),
        "finished"
    );
    Ok(())
}

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
    pub modes: Vec<Mode>,
    /// Write every summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where logs go [default: a temporary directory].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where data sets are cached.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Runs the benchmark and returns its table.
pub async fn bench(args: BenchArgs) -> Result<String, CartelError> {
    let temp = tempfile::Builder::new()
        .prefix("geoml-cartel-bench-")
        .tempdir()
        .map_err(CartelError::io("creating a temporary directory"))?;
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
                geoml: std::env::current_exe().map_err(CartelError::io("finding geoml"))?,
                manifest: manifest.clone(),
                work_dir: root.join(format!("{i}-{}", mode.name())),
                data_dir: args
                    .data_dir
                    .clone()
                    .unwrap_or_else(crate::data::default_cache_dir),
                eval_every: 20,
                progress: false,
                target: None,
            };
            let (_, summary, _) = super::run_detailed(&options, mode).await?;
            summaries.push(summary);
        }
        out.push_str(&table(&manifest.display().to_string(), &summaries));
        all.extend(summaries);
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&all)
            .map_err(|e| CartelError::Protocol(format!("encoding: {e}")))?;
        std::fs::write(path, text)
            .map_err(CartelError::io(format!("writing {}", path.display())))?;
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
