//! A Cartel site: its small model, drift detector and metadata, the loop
//! that trains on its stream, and — in the Collaborative mode — publishing
//! to the registry and borrowing model portions from logical neighbours on
//! drift. `geoml site` runs one as a process; the model exchange it serves
//! hands out per-class weight blocks, never examples. Once its stream has
//! ended a site tells the registry it finished and keeps serving its
//! exchange until the registry says every site of the job has (see
//! [`FinishWait`]), then exits.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use geoml_crds::roles;
use ndarray::Array2;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::divergence::{Summary, normalise, total_variation};
use super::drift::{Adwin, DriftDetector, WindowLimit};
use super::model::OnlineLinear;
use super::pb::model_exchange_client::ModelExchangeClient;
use super::pb::model_exchange_server::{ModelExchange, ModelExchangeServer};
use super::pb::registry_client::RegistryClient;
use super::pb::{NeighboursRequest, PortionsReply, PortionsRequest, SiteMetadata};
use super::scenario::Scenario;
use super::{CartelError, CollaborativeMode, SiteConfig};

/// Bytes a message takes on the wire at the application level: its
/// protobuf encoding plus gRPC's 5-byte length prefix (HTTP/2 and TCP
/// headers are not counted).
#[must_use]
pub fn wire_bytes(message: &impl Message) -> u64 {
    message.encoded_len() as u64 + 5
}

/// One borrowing of model portions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Transfer {
    /// Batch at which the site borrowed.
    pub batch: usize,
    /// The neighbour lent by.
    pub from: String,
    /// Its Jensen–Shannon divergence to the site.
    pub divergence: f64,
    /// Classes received.
    pub classes: Vec<u16>,
    /// Bytes of the request and the reply.
    pub bytes: u64,
}

/// What one site did, written as JSON at its end.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SiteReport {
    /// The site.
    pub site: String,
    /// `cartel`, `isolated`, `centralized` or `global`.
    pub mode: String,
    /// Held-out accuracy on the site's current distribution after each batch.
    pub accuracy: Vec<f64>,
    /// Error on each batch before training on it (prequential).
    pub errors: Vec<f64>,
    /// Seconds since the site started, after each batch.
    pub seconds: Vec<f64>,
    /// Batches at which the drift detector fired.
    pub detections: Vec<usize>,
    /// Batches at which the distribution changed (from the scenario).
    pub drifts: Vec<usize>,
    /// Every borrowing of model portions.
    pub transfers: Vec<Transfer>,
    /// Bytes the site moved to or from other sites and the registry, by message type.
    pub bytes_by_type: BTreeMap<String, u64>,
    /// Model bytes at the end.
    pub model_bytes_final: u64,
    /// Largest model bytes during the run.
    pub model_bytes_peak: u64,
    /// Seconds spent training (not evaluating or talking).
    pub training_seconds: f64,
}

impl SiteReport {
    /// Adds `bytes` under message type `kind`.
    pub fn count(&mut self, kind: &str, bytes: u64) {
        *self.bytes_by_type.entry(kind.to_owned()).or_default() += bytes;
    }
}

/// A site's model, learning loop and summaries, without any networking.
pub struct SiteEngine<'a> {
    scenario: &'a Scenario,
    index: usize,
    config: SiteConfig,
    /// The model, shared with the model exchange.
    pub model: Arc<Mutex<OnlineLinear>>,
    detector: Box<dyn DriftDetector>,
    /// (labels, feature histogram, error) of recent batches, newest last.
    recent: VecDeque<(Vec<u16>, Vec<f64>, f64)>,
    tests: Vec<(Array2<f32>, Vec<u16>)>,
    published: Option<Vec<f64>>,
    since_publish: usize,
    /// What the site did so far.
    pub report: SiteReport,
    started: Instant,
}

/// The outcome of looking at a batch before training on it.
pub struct Observed {
    /// The batch's features.
    pub x: Array2<f32>,
    /// Its labels.
    pub labels: Vec<u16>,
    /// The drift detector fired.
    pub drift: bool,
}

impl<'a> SiteEngine<'a> {
    /// Site `index` of `scenario`.
    #[must_use]
    pub fn new(
        scenario: &'a Scenario,
        index: usize,
        config: SiteConfig,
        mode: CollaborativeMode,
    ) -> Self {
        let plan = &scenario.sites[index];
        let detector: Box<dyn DriftDetector> = if config.adwin {
            Box::new(Adwin::new(0.002, 200))
        } else {
            Box::new(WindowLimit::new(config.window, config.limit))
        };
        Self {
            scenario,
            index,
            model: Arc::new(Mutex::new(OnlineLinear::new(
                scenario.train.features.ncols(),
                config.learning_rate,
                config.l2,
            ))),
            detector,
            recent: VecDeque::new(),
            tests: plan
                .phase_tests
                .iter()
                .map(|rows| scenario.test_rows(rows))
                .collect(),
            published: None,
            since_publish: 0,
            report: SiteReport {
                site: plan.name.clone(),
                mode: mode.name().to_owned(),
                drifts: plan.drifts.clone(),
                ..SiteReport::default()
            },
            config,
            started: Instant::now(),
        }
    }

    /// Batches in the site's stream.
    #[must_use]
    pub fn batches(&self) -> usize {
        self.scenario.sites[self.index].batches.len()
    }

    /// The site's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.scenario.sites[self.index].name
    }

    fn model(&self) -> std::sync::MutexGuard<'_, OnlineLinear> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Predicts batch `b` before training on it and feeds the error to the
    /// drift detector.
    pub fn observe(&mut self, b: usize) -> Observed {
        let (x, labels) = self
            .scenario
            .train_rows(&self.scenario.sites[self.index].batches[b]);
        let error = 1.0 - self.model().accuracy(x.view(), &labels);
        // A new model errs on everything: the detector starts once the site
        // has trained for a metadata interval and a full window.
        let warm_up = self.config.window + self.config.metadata_interval;
        let drift = b >= warm_up && self.detector.observe(error);
        if drift {
            self.report.detections.push(b);
        }
        self.report.errors.push(error);
        let histogram = self.scenario.histogram(x.view());
        self.recent.push_back((labels.clone(), histogram, error));
        let keep = self.config.window.max(self.config.metadata_interval);
        while self.recent.len() > keep {
            self.recent.pop_front();
        }
        self.since_publish += 1;
        Observed { x, labels, drift }
    }

    /// Trains on an observed batch, then evaluates on the current held-out set.
    pub fn train(&mut self, b: usize, observed: &Observed) {
        let started = Instant::now();
        self.model().train(observed.x.view(), &observed.labels);
        self.report.training_seconds += started.elapsed().as_secs_f64();
        let phase = self.scenario.sites[self.index].phase_of_batch[b];
        let model = self
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.record(phase, &model);
    }

    /// Evaluates `model` (the site's own, or one shipped to it) on the
    /// held-out set of `phase` and records it.
    pub fn record(&mut self, phase: usize, model: &OnlineLinear) {
        let accuracy = self
            .tests
            .get(phase)
            .map_or(0.0, |(x, y)| model.accuracy(x.view(), y));
        self.report.accuracy.push(accuracy);
        self.report
            .seconds
            .push(self.started.elapsed().as_secs_f64());
        let bytes = model.bytes();
        self.report.model_bytes_final = bytes;
        self.report.model_bytes_peak = self.report.model_bytes_peak.max(bytes);
    }

    fn summary_of<'b>(
        &self,
        batches: impl Iterator<Item = &'b (Vec<u16>, Vec<f64>, f64)>,
    ) -> Summary {
        let mut priors = vec![0.0; self.scenario.train.classes];
        let mut histogram = vec![0.0; self.scenario.histogram_columns.len()];
        for (labels, h, _) in batches {
            for &l in labels {
                if let Some(p) = priors.get_mut(usize::from(l)) {
                    *p += 1.0;
                }
            }
            for (a, b) in histogram.iter_mut().zip(h) {
                *a += b;
            }
        }
        Summary {
            class_priors: normalise(&priors),
            feature_histogram: if histogram.is_empty() {
                histogram
            } else {
                normalise(&histogram)
            },
        }
    }

    /// Summaries over the last `metadataIntervalBatches` batches.
    #[must_use]
    pub fn recent_summary(&self) -> Summary {
        let skip = self
            .recent
            .len()
            .saturating_sub(self.config.metadata_interval);
        self.summary_of(self.recent.iter().skip(skip))
    }

    /// Summaries and classes of the batches that show the drift: the
    /// trailing batches whose error is above the limit (at least the last).
    #[must_use]
    pub fn drift_summary(&self) -> (Summary, BTreeSet<u16>) {
        let trailing = self
            .recent
            .iter()
            .rev()
            .take(self.config.window)
            .take_while(|(_, _, e)| *e > self.config.limit)
            .count()
            .max(1);
        let from = self.recent.len().saturating_sub(trailing);
        let classes = self
            .recent
            .iter()
            .skip(from)
            .flat_map(|(l, _, _)| l.iter().copied())
            .collect();
        (self.summary_of(self.recent.iter().skip(from)), classes)
    }

    /// True when the metadata is due: every `m` batches, or when the priors
    /// moved by more than the change threshold since last published.
    #[must_use]
    pub fn metadata_due(&self) -> bool {
        match &self.published {
            None => true,
            Some(published) => {
                self.since_publish >= self.config.metadata_interval
                    || total_variation(published, &self.recent_summary().class_priors)
                        > self.config.metadata_change
            }
        }
    }

    /// The metadata to publish now; marks it published.
    pub fn metadata(&mut self, address: &str) -> SiteMetadata {
        // Before its first batch a site has no summary to offer.
        let summary = if self.recent.is_empty() {
            Summary::default()
        } else {
            self.recent_summary()
        };
        self.published = Some(summary.class_priors.clone());
        self.since_publish = 0;
        let model = self.model();
        #[allow(clippy::cast_possible_truncation)] // probabilities as f32
        let floats = |v: &[f64]| v.iter().map(|p| *p as f32).collect();
        SiteMetadata {
            site: self.name().to_owned(),
            address: address.to_owned(),
            class_priors: floats(&summary.class_priors),
            feature_histogram: floats(&summary.feature_histogram),
            model_kind: "OnlineLinear".to_owned(),
            model_bytes: model.bytes(),
            drifting: self.detector.mean() > self.config.limit,
            batches: self.report.errors.len() as u64,
            classes: model.classes().into_iter().map(u32::from).collect(),
            forwarded: false,
            finished: false,
        }
    }
}

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
                .sites(super::pb::SitesRequest {})
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
            .sites(super::pb::SitesRequest {})
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

async fn connect_registry(url: &str) -> Result<RegistryClient<Channel>, CartelError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match RegistryClient::connect(url.to_owned()).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => {
                return Err(CartelError::Protocol(format!("registry {url}: {e}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
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
        let portions = match ModelExchangeClient::connect(neighbour.address.clone()).await {
            Ok(mut client) => client.fetch_portions(request).await,
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
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = server_stopped.wait_for(|s| *s).await;
            }),
    );
    let mut registry = match (&links.registry, mode) {
        (Some(url), CollaborativeMode::Cartel) => Some(connect_registry(url).await?),
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
                && let Err(e) = borrow(&mut engine, registry, b).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(finished: &[bool]) -> Vec<SiteMetadata> {
        finished
            .iter()
            .enumerate()
            .map(|(i, &finished)| SiteMetadata {
                site: format!("site-{i}"),
                finished,
                ..SiteMetadata::default()
            })
            .collect()
    }

    #[test]
    fn everyone_finished_counts_the_jobs_sites_not_only_the_ones_listed() {
        // Told the job has three sites, two finished of two listed is not all.
        assert!(!everyone_finished(&listed(&[true, true]), 3));
        assert!(!everyone_finished(&listed(&[true, false, true]), 3));
        assert!(everyone_finished(&listed(&[true, true, true]), 3));
        // Without a job size, every listed site must have finished.
        assert!(!everyone_finished(&listed(&[true, false]), 0));
        assert!(everyone_finished(&listed(&[true, true]), 0));
        assert!(!everyone_finished(&[], 0));
    }
}
