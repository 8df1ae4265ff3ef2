//! `geoml registry`: Cartel's metadata service. Sites publish their
//! data-distribution summaries; a drifting site asks for its logical
//! neighbours. Every accepted update is persisted (atomically) before it is
//! acknowledged, so a restarted registry answers as before; updates can be
//! forwarded to replicas. A site says when its stream has ended
//! (`SiteMetadata.finished`); with [`ExitWhenFinished`] the registry exits
//! on its own once every site of the job has, after a grace period in which
//! the sites still read that everyone is done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{Mutex, watch};
use tonic::{Request, Response, Status};

use super::CartelError;
use super::divergence::{Summary, nearest};
use super::pb::registry_client::RegistryClient;
use super::pb::registry_server::{Registry, RegistryServer};
use super::pb::{
    Neighbour, NeighboursReply, NeighboursRequest, PublishReply, SiteMetadata, SitesReply,
    SitesRequest,
};
use crate::tls::{Expect, Transport, check_claim, peer_identity};
use geoml_crds::identity::{Identity, Role};

/// File name of the persisted state inside the state directory.
pub const STATE_FILE: &str = "registry.pb";

/// The registry's state: the latest metadata of every site.
#[derive(Debug, Default)]
pub struct RegistryState {
    sites: BTreeMap<String, SiteMetadata>,
    path: Option<PathBuf>,
}

fn summary(priors: &[f32], histogram: &[f32]) -> Summary {
    Summary {
        class_priors: priors.iter().map(|p| f64::from(*p)).collect(),
        feature_histogram: histogram.iter().map(|p| f64::from(*p)).collect(),
    }
}

impl RegistryState {
    /// Loads the state persisted in `dir`, or starts empty; with `None`
    /// nothing is persisted.
    pub fn open(dir: Option<&Path>) -> Result<Self, CartelError> {
        let Some(dir) = dir else {
            return Ok(Self::default());
        };
        std::fs::create_dir_all(dir)
            .map_err(CartelError::io(format!("creating {}", dir.display())))?;
        let path = dir.join(STATE_FILE);
        let sites = match std::fs::read(&path) {
            Ok(bytes) => SitesReply::decode(bytes.as_slice())
                .map_err(|e| CartelError::Protocol(format!("{}: {e}", path.display())))?
                .sites
                .into_iter()
                .map(|s| (s.site.clone(), s))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(CartelError::io(format!("reading {}", path.display()))(e)),
        };
        Ok(Self {
            sites,
            path: Some(path),
        })
    }

    /// Records `metadata` and persists the state.
    pub fn publish(&mut self, mut metadata: SiteMetadata) -> Result<usize, CartelError> {
        metadata.forwarded = false;
        self.sites.insert(metadata.site.clone(), metadata);
        self.persist()?;
        Ok(self.sites.len())
    }

    fn persist(&self) -> Result<(), CartelError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = SitesReply {
            sites: self.sites.values().cloned().collect(),
        }
        .encode_to_vec();
        let temp = path.with_extension("pb.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, path)
        };
        write().map_err(CartelError::io(format!("writing {}", path.display())))
    }

    /// The `k` sites closest to `request`'s summaries.
    #[must_use]
    pub fn neighbours(&self, request: &NeighboursRequest) -> Vec<Neighbour> {
        let me = summary(&request.class_priors, &request.feature_histogram);
        let summaries: Vec<(&str, Summary)> = self
            .sites
            .values()
            // A site that has not summarised any data yet is nobody's neighbour.
            .filter(|s| !s.class_priors.is_empty())
            .map(|s| {
                (
                    s.site.as_str(),
                    summary(&s.class_priors, &s.feature_histogram),
                )
            })
            .collect();
        let k = usize::try_from(request.k).unwrap_or(1);
        nearest(
            &request.site,
            &me,
            summaries.iter().map(|(n, s)| (*n, s)),
            k,
        )
        .into_iter()
        .filter_map(|(name, divergence)| {
            self.sites.get(&name).map(|s| Neighbour {
                site: name,
                address: s.address.clone(),
                divergence,
                classes: s.classes.clone(),
            })
        })
        .collect()
    }

    /// Sites whose latest metadata says their stream has ended.
    #[must_use]
    pub fn finished(&self) -> usize {
        self.sites.values().filter(|s| s.finished).count()
    }

    /// Every site's metadata, by name.
    #[must_use]
    pub fn sites(&self) -> Vec<SiteMetadata> {
        self.sites.values().cloned().collect()
    }
}

/// The gRPC face of [`RegistryState`].
pub struct RegistryService {
    state: Arc<Mutex<RegistryState>>,
    replicas: Vec<String>,
    /// How to reach the replicas.
    transport: Transport,
    /// How many sites have finished, updated on every publish.
    finished: watch::Sender<usize>,
}

impl RegistryService {
    /// A service over `state` forwarding updates to `replicas` (gRPC URLs)
    /// over `transport`.
    #[must_use]
    pub fn new(state: RegistryState, replicas: Vec<String>, transport: Transport) -> Self {
        let (finished, _) = watch::channel(state.finished());
        Self {
            state: Arc::new(Mutex::new(state)),
            replicas,
            transport,
            finished,
        }
    }

    /// Follows the number of sites that have finished.
    #[must_use]
    pub fn finished(&self) -> watch::Receiver<usize> {
        self.finished.subscribe()
    }
}

impl From<CartelError> for Status {
    fn from(e: CartelError) -> Self {
        match e {
            CartelError::Unsupported(m) => Status::unimplemented(m),
            CartelError::Protocol(m) => Status::invalid_argument(m),
            other => Status::internal(other.to_string()),
        }
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    #[tracing::instrument(skip_all, fields(site = %request.get_ref().site))]
    async fn publish(
        &self,
        request: Request<SiteMetadata>,
    ) -> Result<Response<PublishReply>, Status> {
        // A site publishes for itself; only a registry forwards.
        if request.get_ref().forwarded {
            if let Some(caller) = peer_identity(&request)
                && caller.role != Role::Registry
            {
                return Err(Status::permission_denied(format!(
                    "the caller's certificate is the {caller}, which forwards nothing"
                )));
            }
        } else {
            let site = &request.get_ref().site;
            check_claim(&request, &Identity::new(site.clone(), Role::Site))?;
        }
        let metadata = request.into_inner();
        if metadata.site.is_empty() {
            return Err(Status::invalid_argument("site must not be empty"));
        }
        let forward = !metadata.forwarded && !self.replicas.is_empty();
        let copy = forward.then(|| metadata.clone());
        let (sites, finished) = {
            let mut state = self.state.lock().await;
            let sites = state.publish(metadata)?;
            (sites, state.finished())
        };
        self.finished.send_if_modified(|n| {
            let changed = *n != finished;
            *n = finished;
            changed
        });
        if let Some(mut copy) = copy {
            copy.forwarded = true;
            for replica in &self.replicas {
                // Best effort: a replica that is down catches up on the
                // site's next refresh.
                match self
                    .transport
                    .connect(replica, &Expect::role(Role::Registry))
                    .await
                {
                    Ok(channel) => {
                        let mut client = RegistryClient::new(channel);
                        if let Err(e) = client.publish(copy.clone()).await {
                            tracing::warn!(%replica, "forwarding to replica: {e}");
                        }
                    }
                    Err(e) => tracing::warn!(%replica, "connecting to replica: {e}"),
                }
            }
        }
        Ok(Response::new(PublishReply {
            sites: u32::try_from(sites).unwrap_or(u32::MAX),
            finished: u32::try_from(finished).unwrap_or(u32::MAX),
        }))
    }

    #[tracing::instrument(skip_all, fields(site = %request.get_ref().site))]
    async fn neighbours(
        &self,
        request: Request<NeighboursRequest>,
    ) -> Result<Response<NeighboursReply>, Status> {
        let neighbours = self.state.lock().await.neighbours(request.get_ref());
        Ok(Response::new(NeighboursReply { neighbours }))
    }

    async fn sites(&self, _: Request<SitesRequest>) -> Result<Response<SitesReply>, Status> {
        Ok(Response::new(SitesReply {
            sites: self.state.lock().await.sites(),
        }))
    }
}

/// When a registry stops on its own: once `sites` distinct sites have
/// finished, it keeps answering for `grace` (so that every site, polling,
/// reads that all are done), then exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitWhenFinished {
    /// Sites of the job.
    pub sites: usize,
    /// How long to keep answering once they all finished.
    pub grace: Duration,
}

/// Default of [`ExitWhenFinished::grace`]: a few of the sites' 1 s polls.
pub use geoml_crds::roles::DEFAULT_EXIT_GRACE;

/// Serves the registry on `listener` until `shutdown` completes or, with
/// `exit`, until the job's sites have all finished and the grace is over.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state_dir: Option<&Path>,
    replicas: Vec<String>,
    exit: Option<ExitWhenFinished>,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CartelError> {
    let state = RegistryState::open(state_dir)?;
    tracing::info!(
        sites = state.sites.len(),
        finished = state.finished(),
        "registry serving"
    );
    let incoming = transport.incoming(listener);
    let service = RegistryService::new(state, replicas, transport);
    let mut finished = service.finished();
    let all_finished = async move {
        let Some(exit) = exit else {
            return std::future::pending().await;
        };
        // The sender lives in the service, which outlives this future;
        // should it go, there is nobody left to serve.
        let _ = finished.wait_for(|n| *n >= exit.sites).await;
        tracing::info!(
            sites = exit.sites,
            grace = ?exit.grace,
            "every site finished; exiting after the grace period"
        );
        tokio::time::sleep(exit.grace).await;
    };
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            () = all_finished => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(RegistryServer::new(service))
        .serve_with_incoming_shutdown(incoming, stop)
        .await
        .map_err(|e| CartelError::Protocol(format!("serving the registry: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(site: &str, finished: bool) -> SiteMetadata {
        SiteMetadata {
            site: site.into(),
            finished,
            ..SiteMetadata::default()
        }
    }

    #[test]
    fn finished_counts_distinct_sites_and_survives_a_restart() -> Result<(), CartelError> {
        let dir = tempfile::tempdir().map_err(CartelError::io("temporary directory"))?;
        let mut state = RegistryState::open(Some(dir.path()))?;
        state.publish(metadata("a", false))?;
        state.publish(metadata("b", false))?;
        assert_eq!(state.finished(), 0);
        state.publish(metadata("a", true))?;
        state.publish(metadata("a", true))?;
        assert_eq!(state.finished(), 1);
        state.publish(metadata("b", true))?;
        assert_eq!(state.finished(), 2);
        let reopened = RegistryState::open(Some(dir.path()))?;
        assert_eq!(reopened.finished(), 2);
        Ok(())
    }
}
