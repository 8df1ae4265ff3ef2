//! Moving mirror messages: the `Mirror` gRPC service a shard serves, and the
//! links on which it sends to its peers (one connection for control messages,
//! one for data, per peer).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable;
use prost::Message;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::{error, warn};

use super::state::{MirrorError, Outgoing};
use crate::pb::mirror::mirror_client::MirrorClient;
use crate::pb::mirror::mirror_server::Mirror;
use crate::pb::mirror::{
    Ack, Announcement, ClockTick, MirrorUpdate, ShardSnapshot, SnapshotRequest,
};
use crate::retry;
use crate::state::{Progress, State, lock, publish};
use geoml_proto::rows::pack_values;
use geoml_proto::{MAX_MESSAGE_BYTES, WINDOW_BYTES};

impl From<MirrorError> for Status {
    fn from(e: MirrorError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// The `Mirror` service of one shard: applies what peers send.
pub struct MirrorService {
    state: Arc<Mutex<State>>,
    progress: Arc<watch::Sender<Progress>>,
}

impl MirrorService {
    /// Serves `state`, waking readers through `progress`.
    pub fn new(state: Arc<Mutex<State>>, progress: Arc<watch::Sender<Progress>>) -> Self {
        Self { state, progress }
    }

    fn with_mirror<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, MirrorError>,
    ) -> Result<Response<T>, Status> {
        let mut state = lock(&self.state);
        if state.mirror.is_none() {
            return Err(Status::failed_precondition(
                "this shard has no mirrors (the job's mode exchanges nothing between datacenters)",
            ));
        }
        let result = f(&mut state).map_err(|e| {
            warn!("mirror message rejected: {e}");
            Status::from(e)
        })?;
        publish(&state, &self.progress);
        Ok(Response::new(result))
    }
}

#[tonic::async_trait]
impl Mirror for MirrorService {
    async fn announce(&self, request: Request<Announcement>) -> Result<Response<Ack>, Status> {
        let announce = request.into_inner();
        self.with_mirror(|state| {
            let State { shard, mirror, .. } = state;
            mirror
                .as_mut()
                .map_or(Ok(()), |m| m.on_announce(&announce, shard))?;
            Ok(Ack {})
        })
    }

    async fn update(&self, request: Request<MirrorUpdate>) -> Result<Response<Ack>, Status> {
        let update = request.into_inner();
        self.with_mirror(|state| {
            let State { shard, mirror, .. } = state;
            if let Some(m) = mirror.as_mut() {
                m.on_update(&update, shard)?;
            }
            Ok(Ack {})
        })
    }

    async fn tick(&self, request: Request<ClockTick>) -> Result<Response<ClockTick>, Status> {
        let tick = request.into_inner();
        self.with_mirror(|state| {
            let State { shard, mirror, .. } = state;
            if let Some(m) = mirror.as_mut() {
                m.on_tick(&tick, shard)?;
            }
            Ok(tick)
        })
    }

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<ShardSnapshot>, Status> {
        self.with_mirror(|state| {
            #[allow(clippy::cast_possible_truncation)] // reported at f32 precision
            let generated: Vec<f32> = state
                .mirror
                .as_ref()
                .map(|m| m.changes.generated.iter().map(|&g| g as f32).collect())
                .unwrap_or_default();
            Ok(ShardSnapshot {
                values: pack_values(state.shard.values()),
                generated: pack_values(&generated),
            })
        })
    }
}

fn lock_map(
    map: &Mutex<BTreeMap<u64, Instant>>,
) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A gRPC client of a peer's `Mirror` service on its own connection.
fn client(address: &str) -> Result<MirrorClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(address.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(2 * WINDOW_BYTES)
        .connect_lazy();
    Ok(MirrorClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

struct PeerLink {
    control: MirrorClient<Channel>,
    data: MirrorClient<Channel>,
    /// Send times of updates not yet acknowledged, by seq.
    unacknowledged: Arc<Mutex<BTreeMap<u64, Instant>>>,
}

/// Connections to the mirrors of one shard, in the order of its
/// `MirrorConfig::peers`.
pub struct Links {
    peers: Vec<PeerLink>,
    unacknowledged: Arc<AtomicU64>,
}

/// Calls `f` until it succeeds or fails for good; retries with backoff while
/// the peer is unreachable (a WAN partition heals, a restarted peer comes
/// back).
async fn deliver<T, F, Fut>(what: &str, f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    f.retry(retry::backoff(Duration::from_secs(2)))
        .when(retry::unreachable)
        .notify(|status, _| warn!(what, %status, "mirror unreachable; retrying"))
        .await
        .map(Response::into_inner)
        .inspect_err(|status| error!(what, %status, "mirror refused a message"))
        .ok()
}

impl Links {
    /// Lazily connects to each peer shard at `addresses` (`http://host:port`),
    /// twice: control messages never queue behind data.
    pub fn connect(addresses: &[String]) -> Result<Self, tonic::transport::Error> {
        let peers = addresses
            .iter()
            .map(|a| {
                Ok(PeerLink {
                    control: client(a)?,
                    data: client(a)?,
                    unacknowledged: Arc::default(),
                })
            })
            .collect::<Result<_, tonic::transport::Error>>()?;
        Ok(Self {
            peers,
            unacknowledged: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Updates sent and not yet acknowledged, over all peers.
    #[must_use]
    pub fn unacknowledged(&self) -> u64 {
        self.unacknowledged.load(Ordering::SeqCst)
    }

    /// How long the oldest unacknowledged update has been on its way, per peer.
    #[must_use]
    pub fn backlog(&self) -> Vec<Duration> {
        self.peers
            .iter()
            .map(|p| {
                let pending = p
                    .unacknowledged
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                pending
                    .values()
                    .next()
                    .map_or(Duration::ZERO, Instant::elapsed)
            })
            .collect()
    }

    /// Sends `tick` to every peer and waits until each acknowledged it
    /// (or refused it for good).
    pub async fn tell(&self, tick: &ClockTick) {
        let calls = self.peers.iter().map(|link| {
            let client = link.control.clone();
            deliver("tick", move || {
                let (mut client, message) = (client.clone(), tick.clone());
                async move { client.tick(message).await }
            })
        });
        futures::future::join_all(calls).await;
    }

    /// Sends `out` to every peer in the background; acknowledgements record
    /// RTT and throughput in `state`'s mirror.
    pub fn send(&self, out: &Outgoing, state: &Arc<Mutex<State>>) {
        for (p, link) in self.peers.iter().enumerate() {
            if let Some(announce) = &out.announce {
                let (client, announce, state) =
                    (link.control.clone(), announce.clone(), state.clone());
                let bytes = announce.encoded_len();
                tokio::spawn(async move {
                    if deliver("announce", || {
                        let (mut client, message) = (client.clone(), announce.clone());
                        async move { client.announce(message).await }
                    })
                    .await
                    .is_some()
                        && let Some(m) = lock(&state).mirror.as_mut()
                    {
                        m.record_delivered(p, bytes);
                    }
                });
            }
            if let Some(update) = &out.update {
                let (client, update) = (link.data.clone(), update.clone());
                let (state, unacknowledged) = (state.clone(), self.unacknowledged.clone());
                let pending = link.unacknowledged.clone();
                let bytes = update.encoded_len();
                let sent = Instant::now();
                unacknowledged.fetch_add(1, Ordering::SeqCst);
                lock_map(&pending).insert(update.seq, sent);
                tokio::spawn(async move {
                    if deliver("update", || {
                        let (mut client, message) = (client.clone(), update.clone());
                        async move { client.update(message).await }
                    })
                    .await
                    .is_some()
                        && let Some(m) = lock(&state).mirror.as_mut()
                    {
                        m.record_transfer(p, bytes, sent.elapsed());
                        m.record_delivered(p, bytes);
                    }
                    lock_map(&pending).remove(&update.seq);
                    unacknowledged.fetch_sub(1, Ordering::SeqCst);
                });
            }
            if let Some(tick) = &out.tick {
                let (client, tick, state) = (link.control.clone(), tick.clone(), state.clone());
                let bytes = tick.encoded_len();
                tokio::spawn(async move {
                    let sent = Instant::now();
                    if deliver("tick", || {
                        let (mut client, message) = (client.clone(), tick.clone());
                        async move { client.tick(message).await }
                    })
                    .await
                    .is_some()
                        && let Some(m) = lock(&state).mirror.as_mut()
                    {
                        m.record_rtt(p, sent.elapsed());
                        m.record_delivered(p, bytes);
                    }
                });
            }
        }
    }
}
