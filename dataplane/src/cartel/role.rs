//! The `geoml registry` and `geoml site` roles: their arguments and entry points.

use geoml_crds::manifest::Manifest;
use geoml_crds::roles::{RegistryArgs, SiteArgs};
use geoml_crds::topology::Topology;

use super::scenario::Scenario;
use super::site::{FinishWait, Links, run_site};
use super::{CartelError, CollaborativeMode, SiteConfig, registry};
use crate::tls::Transport;

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
        Transport::from_args(&args.tls)?,
        shutdown,
    )
    .await
}

/// A duration given in seconds on the command line.
fn seconds(flag: &str, value: f64) -> Result<std::time::Duration, CartelError> {
    std::time::Duration::try_from_secs_f64(value)
        .map_err(|e| CartelError::Unsupported(format!("{flag} {value}: {e}")))
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
    let mut config = SiteConfig::from_job(&job)?;
    config.adwin = args.adwin;
    let data_dir = args
        .data
        .data_dir
        .clone()
        .unwrap_or_else(crate::data::default_cache_dir);
    if args.no_fetch {
        crate::data::require_cached(spec.dataset.name, &data_dir)?;
    }
    let scenario = Scenario::build(&job, &data_dir)?;
    let index = scenario
        .sites
        .iter()
        .position(|s| s.name == site)
        .ok_or_else(|| {
            CartelError::Unsupported(format!("{site:?} is not a datacenter of the job"))
        })?;
    let transport = Transport::from_args(&args.tls)?;
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
        transport,
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
