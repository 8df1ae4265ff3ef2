//! Moving mirror messages: the `Mirror` gRPC service a shard serves, and the
//! links on which it sends to its peers: per peer, one connection and one
//! task for control messages (announcements, and clock ticks that double as
//! heartbeats) and one of each for data, which carries the link's update in
//! flight until it is acknowledged. Every call has a deadline and the
//! connections HTTP/2 keepalive, so a partition is noticed rather than
//! waited out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::Retryable;
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, error, info, warn};

use super::state::MirrorError;
use crate::metrics::PsMetrics;
use crate::pb::mirror::mirror_client::MirrorClient;
use crate::pb::mirror::mirror_server::Mirror;
use crate::pb::mirror::{
    Ack, Announcement, ClockTick, MirrorUpdate, ShardSnapshot, SnapshotRequest,
};
use crate::retry;
use crate::state::{Progress, State, lock, publish};
use crate::tls::{Expect, Transport, check_claim};
use geoml_crds::identity::{Identity, Role};
use geoml_proto::rows::pack_values;
use geoml_proto::{MAX_MESSAGE_BYTES, WINDOW_BYTES};

/// Why a datacenter that met the target stops once its peers have too
/// (the one that met it last stops with the stopping rule's own reason).
const TARGET_REACHED_EVERYWHERE: &str = "target metric reached here and by every peer";

/// Longest a mirror call may take (a large update over a slow WAN link
/// included) before it counts as lost and is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on every mirror connection, idle or not ...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ... and how long a ping may go unanswered before the connection is
/// dropped (and the next call reconnects).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a shard ticks to each peer when nothing changes, given the
/// peer timeout: a fifth of it (so a few lost ticks do not make a live peer
/// look silent), at most a second.
#[must_use]
pub fn heartbeat(peer_timeout: Option<Duration>) -> Duration {
    peer_timeout.map_or(Duration::from_secs(1), |t| {
        (t / 5).clamp(Duration::from_millis(50), Duration::from_secs(1))
    })
}

impl From<MirrorError> for Status {
    fn from(e: MirrorError) -> Self {
        match e {
            MirrorError::UnknownPeer(_)
            | MirrorError::Rows(_)
            | MirrorError::Coding(_)
            | MirrorError::Shard(_)
            | MirrorError::Durable(_) => Status::invalid_argument(e.to_string()),
            MirrorError::Log(_) => Status::internal(e.to_string()),
        }
    }
}

/// Refuses a mirror message whose sender datacenter is not the one in the
/// caller's certificate, or whose caller is not a parameter server.
fn check_sender<T>(request: &Request<T>, declared: &str) -> Result<(), Status> {
    check_claim(request, &Identity::new(declared, Role::ParameterServer))
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

    /// Runs `f` on the state of a shard with mirrors, after noting that
    /// peer `from` (in `epoch`) spoke.
    fn with_mirror<T>(
        &self,
        from: Option<(&str, u64)>,
        f: impl FnOnce(&mut State) -> Result<T, MirrorError>,
    ) -> Result<Response<T>, Status> {
        let mut state = lock(&self.state);
        let Some(mirror) = state.mirror.as_mut() else {
            return Err(Status::failed_precondition(
                "this shard has no mirrors (the job's mode exchanges nothing between datacenters)",
            ));
        };
        if let Some((datacenter, epoch)) = from
            && let Ok(Some(true)) = mirror.heard(datacenter, epoch, Instant::now())
        {
            info!(
                peer = datacenter,
                "mirror reachable again; it counts for the mirror-clock bound"
            );
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
        check_sender(&request, &request.get_ref().datacenter)?;
        let announce = request.into_inner();
        self.with_mirror(Some((&announce.datacenter, announce.epoch)), |state| {
            let State { shard, mirror, .. } = state;
            mirror
                .as_mut()
                .map_or(Ok(()), |m| m.on_announce(&announce, shard, Instant::now()))?;
            Ok(Ack {})
        })
    }

    async fn update(&self, request: Request<MirrorUpdate>) -> Result<Response<Ack>, Status> {
        check_sender(&request, &request.get_ref().datacenter)?;
        let update = request.into_inner();
        self.with_mirror(Some((&update.datacenter, update.epoch)), |state| {
            // Logged before it is applied and acknowledged.
            let record = match &state.mirror {
                Some(m) => m.accept_update(&update, &state.shard)?,
                None => None,
            };
            if let Some(record) = record {
                state.mirror_step(&record)?;
            }
            Ok(Ack {})
        })
    }

    async fn tick(&self, request: Request<ClockTick>) -> Result<Response<ClockTick>, Status> {
        check_sender(&request, &request.get_ref().datacenter)?;
        let tick = request.into_inner();
        let from = tick.datacenter.clone();
        self.with_mirror(Some((&from, tick.epoch)), |state| {
            let State {
                shard,
                mirror,
                stopped,
                ..
            } = state;
            if let Some(m) = mirror.as_mut() {
                m.on_tick(&tick, shard)?;
                if stopped.is_none() && m.may_stop_on_target() {
                    *stopped = Some(TARGET_REACHED_EVERYWHERE.to_owned());
                }
            }
            Ok(tick)
        })
    }

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<ShardSnapshot>, Status> {
        self.with_mirror(None, |state| {
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

/// A gRPC client of a peer's `Mirror` service on its own connection, with a
/// deadline on every call and HTTP/2 keepalive.
fn client(
    address: &str,
    peer: &str,
    transport: &Transport,
) -> Result<MirrorClient<Channel>, tonic::transport::Error> {
    let endpoint = transport
        .endpoint(address)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(2 * WINDOW_BYTES);
    let server = Expect::identity(Identity::new(peer, Role::ParameterServer));
    let channel = transport.lazy(&endpoint, &server);
    Ok(MirrorClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

struct PeerLink {
    control: MirrorClient<Channel>,
    data: MirrorClient<Channel>,
    /// Something may be queued for the data task.
    data_wake: Notify,
    /// The tick or an announcement may have changed.
    control_wake: Notify,
    /// Since when the update in flight has been on its way.
    in_flight_since: Mutex<Option<Instant>>,
}

/// Connections to the mirrors of one shard, in the order of its
/// `MirrorConfig::peers`.
pub struct Links {
    peers: Vec<PeerLink>,
    heartbeat: Duration,
}

/// Calls `f` until it succeeds or fails for good; retries with backoff while
/// `again` says the failure may pass (the peer is unreachable: a WAN
/// partition heals, a restarted peer comes back).
async fn deliver<T, F, Fut>(what: &str, again: fn(&Status) -> bool, f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    f.retry(retry::backoff(Duration::from_secs(2)))
        .when(again)
        .notify(|status, _| debug!(what, %status, "mirror unreachable; retrying"))
        .await
        .map(Response::into_inner)
        .inspect_err(|status| error!(what, %status, "mirror refused a message"))
        .ok()
}

impl Links {
    /// Lazily connects to the shard of each datacenter of `peers` at its
    /// address in `addresses` (`http://host:port`), twice: control messages
    /// never queue behind data. Idle links tick every `heartbeat`.
    pub fn connect(
        peers: &[String],
        addresses: &[String],
        heartbeat: Duration,
        transport: &Transport,
    ) -> Result<Self, tonic::transport::Error> {
        let peers = peers
            .iter()
            .zip(addresses)
            .map(|(peer, a)| {
                Ok(PeerLink {
                    control: client(a, peer, transport)?,
                    data: client(a, peer, transport)?,
                    data_wake: Notify::new(),
                    control_wake: Notify::new(),
                    in_flight_since: Mutex::new(None),
                })
            })
            .collect::<Result<_, tonic::transport::Error>>()?;
        Ok(Self { peers, heartbeat })
    }

    /// How long the update in flight has been on its way, per peer.
    #[must_use]
    pub fn backlog(&self) -> Vec<Duration> {
        self.peers
            .iter()
            .map(|p| {
                p.in_flight_since
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .map_or(Duration::ZERO, |since| since.elapsed())
            })
            .collect()
    }

    /// Tells every link's tasks that the state may have something for them.
    pub fn wake(&self) {
        for link in &self.peers {
            link.data_wake.notify_one();
            link.control_wake.notify_one();
        }
    }

    /// Starts the tasks that carry `state`'s mirror messages (a data and a
    /// control task per peer) and the one that notices silent peers; they
    /// run until aborted.
    pub fn start(
        self: &Arc<Self>,
        state: &Arc<Mutex<State>>,
        progress: &Arc<watch::Sender<Progress>>,
        metrics: &PsMetrics,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for p in 0..self.peers.len() {
            tasks.push(tokio::spawn(carry_updates(self.clone(), p, state.clone())));
            tasks.push(tokio::spawn(carry_control(self.clone(), p, state.clone())));
        }
        tasks.push(tokio::spawn(watch_peers(
            self.heartbeat,
            state.clone(),
            progress.clone(),
            metrics.clone(),
        )));
        tasks
    }

    /// Sends `tick` to every peer and waits until each acknowledged it
    /// (or refused it for good).
    pub async fn tell(&self, tick: &ClockTick) {
        let calls = self.peers.iter().map(|link| {
            let client = link.control.clone();
            deliver("tick", retry::unreachable, move || {
                let (mut client, message) = (client.clone(), tick.clone());
                async move { client.tick(message).await }
            })
        });
        futures::future::join_all(calls).await;
    }
}

fn unreachable_or_internal(status: &Status) -> bool {
    retry::unreachable(status) || status.code() == tonic::Code::Internal
}

/// The data task of link `p`: sends the update in flight (forming it from
/// the queue when the link is idle) until the peer acknowledges it; retries
/// while the peer is unreachable. One task and at most one update per peer,
/// however long a partition lasts.
async fn carry_updates(links: Arc<Links>, p: usize, state: Arc<Mutex<State>>) {
    let link = &links.peers[p];
    loop {
        let now = Instant::now();
        let (next, budget_wait) = {
            let mut guard = lock(&state);
            let Some(record) = guard
                .mirror
                .as_ref()
                .map(|m| m.form(p, guard.shard.values(), now))
            else {
                return;
            };
            if let Some(record) = record
                && let Err(e) = guard.mirror_step(&record)
            {
                error!(peer = p, "could not form the next mirror update: {e}");
            }
            let m = guard.mirror.as_ref();
            (
                m.and_then(|m| m.in_flight(p).cloned()),
                m.and_then(|m| m.budget_wait(p, now)),
            )
        };
        let Some(update) = next else {
            // Woken when something is queued, or when the budget has room.
            let wait = budget_wait
                .filter(|w| !w.is_zero())
                .map_or(links.heartbeat, |w| w.min(links.heartbeat));
            let _ = tokio::time::timeout(wait, link.data_wake.notified()).await;
            continue;
        };
        let sent = Instant::now();
        *link
            .in_flight_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sent);
        let bytes = update.encoded_len();
        // A receiver that could not log the update (`Internal`) did not
        // apply it either: it is tried again too.
        let delivered = deliver("update", unreachable_or_internal, || {
            let (mut client, message) = (link.data.clone(), update.clone());
            async move { client.update(message).await }
        })
        .await
        .is_some();
        *link
            .in_flight_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        if let Some(m) = lock(&state).mirror.as_mut() {
            // Refused for good, it would block the link forever: it is
            // dropped (and the refusal logged by `deliver`).
            m.acknowledged(p, (update.epoch, update.seq), Instant::now());
            if delivered {
                m.record_transfer(p, bytes, sent.elapsed());
            }
        }
    }
}

/// The control task of link `p`: sends announcements as they come, and the
/// clock tick whenever it changes and at least every heartbeat (the peer's
/// sign that this shard is alive); one attempt each, the next heartbeat
/// retries.
async fn carry_control(links: Arc<Links>, p: usize, state: Arc<Mutex<State>>) {
    let link = &links.peers[p];
    let mut last: Option<(ClockTick, Instant)> = None;
    loop {
        let (announce, tick) = {
            let guard = lock(&state);
            let Some(m) = guard.mirror.as_ref() else {
                return;
            };
            (m.announcement(p), m.tick())
        };
        if let Some(announce) = announce {
            let bytes = announce.encoded_len();
            let seq = announce.seq;
            match link.control.clone().announce(announce).await {
                Ok(_) => {
                    if let Some(m) = lock(&state).mirror.as_mut() {
                        m.announcement_sent(p, seq, bytes, Instant::now());
                    }
                }
                Err(status) => debug!(%status, "announcement not taken"),
            }
        }
        let due = last
            .as_ref()
            .is_none_or(|(sent, at)| *sent != tick || at.elapsed() >= links.heartbeat);
        if due {
            let sent = Instant::now();
            let bytes = tick.encoded_len();
            match link.control.clone().tick(tick.clone()).await {
                Ok(_) => {
                    if let Some(m) = lock(&state).mirror.as_mut() {
                        m.tick_sent(p, bytes, sent.elapsed(), Instant::now());
                    }
                    last = Some((tick, sent));
                }
                Err(status) if retry::unreachable(&status) => {
                    debug!(%status, "tick not taken");
                }
                Err(status) => error!(%status, "mirror refused a tick"),
            }
        }
        let _ = tokio::time::timeout(links.heartbeat / 2, link.control_wake.notified()).await;
    }
}

/// Notices peers that went silent for longer than the peer timeout (they
/// stop holding the mirror-clock bound) and expired announcements, logs it,
/// and keeps the mirror metrics and waiting readers up to date.
async fn watch_peers(
    heartbeat: Duration,
    state: Arc<Mutex<State>>,
    progress: Arc<watch::Sender<Progress>>,
    metrics: PsMetrics,
) {
    loop {
        tokio::time::sleep(heartbeat / 2).await;
        let mut guard = lock(&state);
        let Some(m) = guard.mirror.as_mut() else {
            return;
        };
        for (peer, reachable) in m.refresh(Instant::now()) {
            if !reachable {
                warn!(
                    peer,
                    reachable = m.peers_reachable(),
                    "mirror silent for longer than the peer timeout; the mirror-clock bound no longer counts it"
                );
            }
        }
        metrics.observe_mirror(&m.status());
        publish(&guard, &progress);
    }
}
