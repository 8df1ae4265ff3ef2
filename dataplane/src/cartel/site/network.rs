//! A site over the network: the model exchange it serves, publishing to the
//! registry, borrowing from neighbours and waiting for every site to finish.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backon::Retryable;
use geoml_crds::identity::{Identity, Role};
use geoml_crds::roles;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{SiteEngine, SiteReport, Transfer, wire_bytes};
use crate::cartel::model::OnlineLinear;
use crate::cartel::pb::model_exchange_client::ModelExchangeClient;
use crate::cartel::pb::model_exchange_server::{ModelExchange, ModelExchangeServer};
use crate::cartel::pb::registry_client::RegistryClient;
use crate::cartel::pb::{NeighboursRequest, PortionsReply, PortionsRequest, SiteMetadata};
use crate::cartel::scenario::Scenario;
use crate::cartel::{CartelError, CollaborativeMode, SiteConfig};
use crate::retry;
use crate::tls::{Expect, Transport};

/// The model exchange a site serves: portions of its model, never examples.
pub struct Exchange {
    name: String,
    model: Arc<Mutex<OnlineLinear>>,
}

#[tonic::async_trait]
impl ModelExchange for Exchange {
    #[tracing::instrument(skip_all, fields(from = %request.get_ref().site))]
    async fn fetch_portions(
        &self,
        request: Request<PortionsRequest>,
    ) -> Result<Response<PortionsReply>, Status> {
        let classes: Vec<u16> = request
            .get_ref()
            .classes
            .iter()
            .filter_map(|c| u16::try_from(*c).ok())
            .collect();
        let model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Response::new(PortionsReply {
            site: self.name.clone(),
            features: u32::try_from(model.features()).unwrap_or(u32::MAX),
            blocks: model.portions(&classes),
        }))
    }
}

/// How a site process reaches the others.
#[derive(Clone, Debug)]
pub struct Links {
    /// The registry's gRPC URL (Collaborative mode).
    pub registry: Option<String>,
    /// The URL other sites reach this site's exchange at.
    pub advertise: String,
    /// Start training only once the registry knows this many sites (0: at
    /// once); after its stream, wait for this many to finish (0: every site
    /// the registry knows).
    pub expect_sites: usize,
    /// How the site waits for the others once its stream has ended.
    pub finish: FinishWait,
    /// How the site serves its exchange and reaches the registry and its
    /// neighbours: mTLS or plaintext.
    pub transport: Transport,
}

/// How a site whose stream has ended waits, still serving its model
/// exchange, for the registry to say that every site of the job has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishWait {
    /// How often to ask the registry.
    pub poll: Duration,
    /// How long the registry may be unreachable before the site takes it
    /// to have exited, which it does only once every site finished.
    pub registry_grace: Duration,
    /// How long to wait for the other sites at most; then the site fails.
    pub timeout: Duration,
}

impl Default for FinishWait {
    fn default() -> Self {
        Self {
            poll: roles::DEFAULT_FINISH_POLL,
            registry_grace: roles::DEFAULT_REGISTRY_GRACE,
            timeout: roles::DEFAULT_FINISH_TIMEOUT,
        }
    }
}

/// True when the registry's list of `sites` says every site of the job has
/// finished: at least `expect_sites` of them, or with 0 every site listed.
#[must_use]
pub fn everyone_finished(sites: &[SiteMetadata], expect_sites: usize) -> bool {
    let finished = sites.iter().filter(|s| s.finished).count();
    if expect_sites == 0 {
        finished > 0 && finished == sites.len()
    } else {
        finished >= expect_sites
    }
}

/// Why a finished site stopped waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waited {
    /// The registry said every site finished.
    Everyone,
    /// The registry stayed unreachable for the grace period.
    RegistryGone,
    /// The process was asked to stop.
    Stopped,
}

/// Tells the registry the site finished (`finished` is its last metadata,
/// flagged) until it has heard, then waits until every site of the job has
/// finished, the registry has gone, or `stop` is set.
async fn wait_for_everyone(
    registry: &mut RegistryClient<Channel>,
    finished: &SiteMetadata,
    links: &Links,
    stop: &mut watch::Receiver<bool>,
) -> Result<Waited, CartelError> {
    let wait = links.finish;
    let started = Instant::now();
    let mut announced = false;
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let attempt = async {
            if !announced {
                let reply = registry.publish(finished.clone()).await?.into_inner();
                announced = true;
                if links.expect_sites > 0
                    && usize::try_from(reply.finished).unwrap_or(usize::MAX) >= links.expect_sites
                {
                    return Ok(true);
                }
            }
            let sites = registry
                .sites(crate::cartel::pb::SitesRequest {})
                .await?
                .into_inner()
                .sites;
            Ok::<_, Status>(everyone_finished(&sites, links.expect_sites))
        };
        match tokio::time::timeout(wait.registry_grace, attempt).await {
            Ok(Ok(true)) => return Ok(Waited::Everyone),
            Ok(Ok(false)) => unreachable_since = None,
            Ok(Err(e)) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                tracing::debug!("asking the registry: {}", e.message());
                if since.elapsed() >= wait.registry_grace {
                    return Ok(Waited::RegistryGone);
                }
            }
            // The attempt took the whole grace.
            Err(_) => return Ok(Waited::RegistryGone),
        }
        if started.elapsed() >= wait.timeout {
            return Err(CartelError::Protocol(format!(
                "not every site finished within {:?} of this one",
                wait.timeout
            )));
        }
        tokio::select! {
            () = tokio::time::sleep(wait.poll) => {}
            _ = stop.wait_for(|s| *s) => return Ok(Waited::Stopped),
        }
    }
}

/// Waits until the registry lists at least `sites` sites.
async fn wait_for_sites(
    registry: &mut RegistryClient<Channel>,
    sites: usize,
) -> Result<(), CartelError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let known = registry
            .sites(crate::cartel::pb::SitesRequest {})
            .await
            .map_err(|e| CartelError::Protocol(format!("listing sites: {}", e.message())))?
            .into_inner()
            .sites
            .len();
        if known >= sites {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CartelError::Protocol(format!(
                "the registry knows {known} of {sites} sites after 120 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects to the registry, retrying with backoff for up to a minute while
/// it starts.
async fn connect_registry(
    url: &str,
    transport: &Transport,
) -> Result<RegistryClient<Channel>, CartelError> {
    let backoff =
        retry::backoff(Duration::from_secs(1)).with_total_delay(Some(Duration::from_secs(60)));
    let registry = Expect::role(Role::Registry);
    (|| transport.connect(url, &registry))
        .retry(backoff)
        .await
        .map(RegistryClient::new)
        .map_err(|e| CartelError::Protocol(format!("registry {url}: {e}")))
}

async fn publish(
    engine: &mut SiteEngine<'_>,
    registry: &mut RegistryClient<Channel>,
    address: &str,
) -> Result<(), CartelError> {
    let metadata = engine.metadata(address);
    let bytes = wire_bytes(&metadata);
    let reply = registry
        .publish(metadata)
        .await
        .map_err(|e| CartelError::Protocol(format!("publishing metadata: {}", e.message())))?
        .into_inner();
    engine.report.count("metadata", bytes + wire_bytes(&reply));
    Ok(())
}

/// On drift: asks the registry for the k nearest sites, fetches the blocks
/// of the classes the drifted batches show, merges them and drops the
/// blocks of classes the site no longer sees.
async fn borrow(
    engine: &mut SiteEngine<'_>,
    registry: &mut RegistryClient<Channel>,
    transport: &Transport,
    batch: usize,
) -> Result<(), CartelError> {
    let (summary, classes) = engine.drift_summary();
    #[allow(clippy::cast_possible_truncation)] // probabilities as f32
    let floats = |v: &[f64]| v.iter().map(|p| *p as f32).collect();
    let request = NeighboursRequest {
        site: engine.name().to_owned(),
        class_priors: floats(&summary.class_priors),
        feature_histogram: floats(&summary.feature_histogram),
        k: u32::try_from(engine.config.neighbours).unwrap_or(1),
    };
    let request_bytes = wire_bytes(&request);
    let reply = registry
        .neighbours(request)
        .await
        .map_err(|e| CartelError::Protocol(format!("asking for neighbours: {}", e.message())))?
        .into_inner();
    engine
        .report
        .count("neighbours", request_bytes + wire_bytes(&reply));
    let mut merged_any = false;
    for neighbour in reply.neighbours {
        let wanted: Vec<u32> = classes
            .iter()
            .map(|c| u32::from(*c))
            .filter(|c| neighbour.classes.contains(c))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let request = PortionsRequest {
            site: engine.name().to_owned(),
            classes: wanted,
        };
        let request_bytes = wire_bytes(&request);
        let server = Expect::identity(Identity::new(&neighbour.site, Role::Site));
        let portions = match transport.connect(&neighbour.address, &server).await {
            Ok(channel) => {
                ModelExchangeClient::new(channel)
                    .fetch_portions(request)
                    .await
            }
            Err(e) => {
                tracing::warn!(neighbour = %neighbour.site, "connecting: {e}");
                continue;
            }
        };
        let portions = match portions {
            Ok(reply) => reply.into_inner(),
            Err(e) => {
                tracing::warn!(neighbour = %neighbour.site, "fetching portions: {}", e.message());
                continue;
            }
        };
        let bytes = request_bytes + wire_bytes(&portions);
        engine.report.count("portions", bytes);
        let merged = engine.model().merge(&portions.blocks);
        merged_any |= merged > 0;
        tracing::info!(batch, neighbour = %neighbour.site, divergence = neighbour.divergence, merged, "borrowed model portions");
        if merged == 0 {
            continue;
        }
        engine.report.transfers.push(Transfer {
            batch,
            from: neighbour.site,
            divergence: neighbour.divergence,
            classes: portions
                .blocks
                .iter()
                .filter_map(|b| u16::try_from(b.class).ok())
                .collect(),
            bytes,
        });
    }
    if merged_any {
        engine.model().retain(&classes);
    }
    Ok(())
}

/// Runs site `index` of `scenario` to the end of its stream, serving its
/// model exchange on `listener`; writes its report to `report_path` and
/// returns it. In the Collaborative mode the exchange keeps serving, so
/// that neighbours can still borrow, until the registry says every site
/// finished or is gone (see [`FinishWait`]); without a registry the site
/// returns at the end of its stream. `shutdown` stops the exchange early.
#[allow(clippy::too_many_arguments)] // each is a separate input of a site process; `geoml site` is the caller
pub async fn run_site(
    scenario: &Scenario,
    index: usize,
    config: SiteConfig,
    mode: CollaborativeMode,
    links: &Links,
    listener: tokio::net::TcpListener,
    report_path: Option<&std::path::Path>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SiteReport, CartelError> {
    let mut engine = SiteEngine::new(scenario, index, config, mode);
    let exchange = Exchange {
        name: engine.name().to_owned(),
        model: Arc::clone(&engine.model),
    };
    // Set on `shutdown`, or once the site is done serving.
    let (stop, mut stopped) = watch::channel(false);
    let on_shutdown = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_shutdown.send(true);
    });
    let mut server_stopped = stopped.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ModelExchangeServer::new(exchange))
            .serve_with_incoming_shutdown(links.transport.incoming(listener), async move {
                let _ = server_stopped.wait_for(|s| *s).await;
            }),
    );
    let mut registry = match (&links.registry, mode) {
        (Some(url), CollaborativeMode::Cartel) => {
            Some(connect_registry(url, &links.transport).await?)
        }
        _ => None,
    };
    if let Some(registry) = registry.as_mut() {
        // Announce the site before training, with an empty summary.
        publish(&mut engine, registry, &links.advertise).await?;
        wait_for_sites(registry, links.expect_sites).await?;
    }
    for b in 0..engine.batches() {
        let observed = engine.observe(b);
        if let Some(registry) = registry.as_mut() {
            if observed.drift
                && let Err(e) = borrow(&mut engine, registry, &links.transport, b).await
            {
                tracing::warn!("borrowing on drift: {e}");
            }
            if engine.metadata_due() {
                publish(&mut engine, registry, &links.advertise).await?;
            }
        }
        engine.train(b, &observed);
    }
    let report = engine.report.clone();
    if let Some(path) = report_path {
        // Written whole under a temporary name, then renamed: a reader
        // never sees half a report.
        let text = serde_json::to_string(&report)
            .map_err(|e| CartelError::Protocol(format!("encoding the report: {e}")))?;
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, text)
            .and_then(|()| std::fs::rename(&temp, path))
            .map_err(CartelError::io(format!("writing {}", path.display())))?;
    }
    if let Some(registry) = registry.as_mut() {
        let mut finished = engine.metadata(&links.advertise);
        finished.finished = true;
        tracing::info!(
            batches = finished.batches,
            "stream ended; serving the model exchange until every site finished"
        );
        match wait_for_everyone(registry, &finished, links, &mut stopped).await? {
            Waited::Everyone => tracing::info!("every site finished"),
            Waited::RegistryGone => tracing::info!(
                grace = ?links.finish.registry_grace,
                "the registry is gone, which it is only once every site finished"
            ),
            Waited::Stopped => tracing::info!("asked to stop"),
        }
    }
    let _ = stop.send(true);
    server
        .await
        .map_err(|e| CartelError::Protocol(format!("model exchange task: {e}")))?
        .map_err(|e| CartelError::Protocol(format!("serving the model exchange: {e}")))?;
    Ok(report)
}
