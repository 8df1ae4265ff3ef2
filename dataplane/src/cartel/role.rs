//! The `geoml registry` and `geoml site` roles: their arguments and entry points.

use std::net::SocketAddr;
use std::path::PathBuf;

use geoml_crds::manifest::Manifest;
use geoml_crds::topology::Topology;

use super::scenario::Scenario;
use super::site::{FinishWait, Links, run_site};
use super::{CartelError, CollaborativeMode, SiteConfig, registry};

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
    pub mode: CollaborativeMode,
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
    if args.mode == CollaborativeMode::Cartel && links.registry.is_none() {
        return Err(CartelError::Unsupported(
            "mode cartel needs --registry or a topology with a registry".into(),
        ));
    }
    if !matches!(
        args.mode,
        CollaborativeMode::Cartel | CollaborativeMode::Isolated
    ) {
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
