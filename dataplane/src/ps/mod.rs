//! Parameter servers: a model's rows sharded over processes, consistency
//! models, the stopping rule, checkpoints, and the gRPC server with the row
//! transport beside it on the same port.

pub mod durability;
pub mod optimizer;
pub mod policy;
pub mod rows;
pub mod service;
pub mod shard;
pub mod stopping;

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use geoml_crds::training_job::Optimizer;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::util::MapResponseLayer;
use tracing::{info, warn};

use self::durability::Durability;
use self::service::ShardService;
use self::shard::{Consistency, Shard, ShardError};
use self::stopping::StoppingRule;
use crate::gaia::service::{Links, MirrorService};
use crate::gaia::state::{MirrorConfig, MirrorState};
use crate::metrics::PsMetrics;
use crate::model::Model;
use crate::pb::mirror::mirror_server::MirrorServer;
use crate::pb::parameter_server_server::ParameterServerServer;
use crate::state::{Progress, State, lock};
use crate::tls::Transport;
use geoml_proto::rows::{Values, unpack_keys};

pub use geoml_proto::{MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, WINDOW_BYTES};

/// Everything one shard server needs to know.
#[derive(Clone, Debug)]
pub struct PsConfig {
    /// Index of this shard.
    pub shard: u32,
    /// Number of shards.
    pub shards: u32,
    /// Number of workers that push to it.
    pub workers: usize,
    /// Consistency model among the workers.
    pub consistency: Consistency,
    /// Update rule.
    pub optimizer: Optimizer,
    /// Learning rate of the update rule.
    pub learning_rate: f32,
    /// When training stops.
    pub stopping: StoppingRule,
    /// Seed of the initial model.
    pub seed: u64,
    /// This shard's datacenter.
    pub datacenter: String,
    /// The mirrors in other datacenters and their addresses (`http://...`,
    /// in `MirrorConfig::peers` order), when the mode exchanges updates.
    pub mirror: Option<(MirrorConfig, Vec<String>)>,
    /// Where to keep checkpoints and the write-ahead log, and how often to
    /// checkpoint (in clocks); `None` keeps everything in memory.
    pub checkpoint: Option<(PathBuf, u64)>,
    /// Global indexes of the workers of this shard's own datacenter; the
    /// others (naive WAN modes) reach it over the WAN.
    pub local_workers: Range<u32>,
    /// Stop serving on its own once training is done (see [`serve`]);
    /// otherwise serve until the shutdown future completes.
    pub exit_when_done: bool,
    /// Once training stopped, how long to wait for every worker to leave
    /// and every update to reach the mirrors before exiting anyway.
    pub drain_timeout: Duration,
    /// The manifest file and the text the job was started from: re-read
    /// every [`policy::RELOAD_INTERVAL`] to apply SyncPolicy changes live.
    pub manifest: Option<(PathBuf, String)>,
    /// How the shard serves and reaches its mirrors: mTLS or plaintext.
    pub transport: Transport,
}

/// What can stop a parameter server.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// Reading or writing checkpoints failed.
    #[error("checkpoint directory: {0}")]
    Io(#[from] std::io::Error),
    /// A checkpoint or log record does not fit the model.
    #[error("restoring: {0}")]
    Restore(#[from] ShardError),
    /// A logged push is malformed.
    #[error("restoring the write-ahead log: {0}")]
    Log(#[from] geoml_proto::rows::RowsError),
    /// The gRPC server failed.
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A checkpoint's mirror state or a logged mirror record does not fit.
    #[error("restoring mirror state: {0}")]
    Mirror(#[from] crate::gaia::state::MirrorError),
    /// A checkpoint's mirror state or a logged mirror record is malformed.
    #[error("restoring mirror state: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// tonic refuses messages over the size limit with `OutOfRange` before a
/// handler runs; to clients that is a request too large for the server:
/// `ResourceExhausted`. No handler here answers `OutOfRange` itself.
fn too_large_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
    if response
        .headers()
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == out_of_range.as_bytes())
    {
        let exhausted = (tonic::Code::ResourceExhausted as i32).to_string();
        if let Ok(value) = http::HeaderValue::from_str(&exhausted) {
            response.headers_mut().insert("grpc-status", value);
        }
    }
    response
}

/// Opens the checkpoint directory `dir` and brings `shard` and its `mirror`
/// state back to what it acknowledged: the last checkpoint plus the
/// write-ahead log, replayed in order. Returns the durability handle and why
/// training had stopped, if it had.
fn restore(
    shard: &mut Shard,
    mut mirror: Option<&mut MirrorState>,
    dir: &std::path::Path,
    interval: u64,
) -> Result<(Durability, Option<String>), PsError> {
    use crate::pb::wal_record::Record;
    use prost::Message as _;

    let started = Instant::now();
    let (durability, recovered) = Durability::open(dir, interval)?;
    let mut stopped = None;
    if let Some(checkpoint) = &recovered.checkpoint {
        shard.restore(checkpoint)?;
        stopped = checkpoint.stopped.then(|| checkpoint.stop_reason.clone());
        if let Some(mirror) = mirror.as_deref_mut()
            && !checkpoint.mirror.is_empty()
        {
            mirror.restore(&crate::pb::mirror::MirrorCheckpoint::decode(
                checkpoint.mirror.as_slice(),
            )?)?;
        }
    }
    for record in &recovered.log {
        match &record.record {
            Some(Record::Push(push)) => {
                let gradient = push.gradient.clone().unwrap_or_default();
                let keys = (!gradient.all)
                    .then(|| unpack_keys(&gradient.keys))
                    .transpose()?;
                let values = Values::new(&gradient.values)?;
                if let Some(rows) = shard.check(push.worker, push.clock, keys.as_deref(), values)? {
                    let changes = mirror.as_deref_mut().map(|m| &mut m.changes);
                    shard.commit(push.worker, push.clock, &rows, values, changes);
                }
            }
            Some(Record::Mirror(bytes)) => {
                if let Some(mirror) = mirror.as_deref_mut() {
                    let record = crate::pb::mirror::MirrorLogRecord::decode(bytes.as_slice())?;
                    mirror.apply(&record, shard)?;
                }
            }
            None => {}
        }
    }
    info!(
        shard = shard.id(),
        checkpoint = recovered.checkpoint.is_some(),
        replayed = recovered.log.len(),
        replayed_bytes = recovered.log_bytes,
        seconds = started.elapsed().as_secs_f64(),
        min_clock = shard.min_clock(),
        "restored"
    );
    Ok((durability, stopped))
}

/// Starts a new mirror epoch for this run of the shard; the time keeps it
/// above any earlier one even when nothing was restored.
fn start_epoch(mirror: &mut MirrorState, shard: &Shard) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = mirror.start_epoch(u64::try_from(now.as_millis()).unwrap_or(u64::MAX));
    mirror.resume_at(shard.min_clock());
    info!(epoch, "mirror epoch");
}

/// How often a shard looks whether its part of training is over.
const FINISH_POLL: Duration = Duration::from_millis(100);

/// Completes once the shard may exit: training stopped, every worker left,
/// everything generated here reached the mirrors, this shard told its peers
/// so and heard the same from each of them (so none is left with an update
/// it cannot deliver). Waiting for workers and own deliveries gives up after
/// `drain_timeout` (and still tells the peers, which would otherwise wait for
/// it forever); waiting for peers gives up only once every peer not yet
/// drained has been silent for `drain_timeout` (a live peer may train
/// longer; a gone one never answers).
async fn training_done(
    state: Arc<Mutex<State>>,
    links: Option<Arc<Links>>,
    drain_timeout: Duration,
) {
    let mut since = None;
    let tick = loop {
        tokio::time::sleep(FINISH_POLL).await;
        let mut guard = lock(&state);
        if guard.stopped.is_none() {
            continue;
        }
        let since = *since.get_or_insert_with(Instant::now);
        if guard.finished() {
            break guard.mirror.as_mut().map(MirrorState::drained_tick);
        }
        if since.elapsed() > drain_timeout {
            let left = guard.left.iter().filter(|&&l| l).count();
            let undelivered = guard.mirror.as_ref().is_some_and(|m| !m.drained());
            warn!(
                left,
                workers = guard.left.len(),
                undelivered,
                "training stopped {drain_timeout:?} ago, yet not every worker left or not every update reached the mirrors; exiting anyway"
            );
            // It sends nothing more: the peers need not wait for it.
            break guard.mirror.as_mut().map(MirrorState::drained_tick);
        }
        // A shard restored stopped sees no push that would flush what it
        // holds: flush once the workers are gone (a no-op when nothing is left).
        if guard.left.iter().all(|&l| l)
            && let (
                Some(links),
                State {
                    shard,
                    mirror: Some(mirror),
                    ..
                },
            ) = (&links, &mut *guard)
        {
            let record = mirror.on_clock(
                shard.values(),
                shard.min_clock(),
                true,
                &links.backlog(),
                Instant::now(),
            );
            if let Some(record) = record
                && let Err(e) = guard.mirror_step(&record)
            {
                warn!("flushing the accumulated updates: {e}");
            }
            links.wake();
        }
    };
    let (Some(tick), Some(links)) = (tick, links) else {
        return;
    };
    info!("drained; telling the mirrors and waiting for theirs");
    if tokio::time::timeout(drain_timeout, links.tell(&tick))
        .await
        .is_err()
    {
        warn!("a mirror did not take the drained tick within {drain_timeout:?}");
    }
    let waiting = Instant::now();
    loop {
        if let Some(m) = lock(&state).mirror.as_ref() {
            if m.peers_drained() {
                return;
            }
            if waiting.elapsed() > drain_timeout
                && !m.undrained_heard_within(Instant::now(), drain_timeout)
            {
                warn!(
                    "the peers not yet drained have been silent for {drain_timeout:?}; exiting without them"
                );
                return;
            }
        } else {
            return;
        }
        tokio::time::sleep(FINISH_POLL).await;
    }
}

/// Completes when `shutdown` does or, if given, when training is `done`.
async fn first_of(shutdown: impl Future<Output = ()>, done: Option<impl Future<Output = ()>>) {
    let done = async move {
        match done {
            Some(done) => {
                done.await;
                info!("training is done; stopping");
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = done => {}
    }
}

/// Starts re-reading the manifest file `manifest` (path and the text the
/// shard started from) for live SyncPolicy changes.
fn watch_policy(
    (path, text): (PathBuf, String),
    state: &Arc<Mutex<State>>,
    progress: &Arc<watch::Sender<Progress>>,
    metrics: PsMetrics,
) -> Option<tokio::task::JoinHandle<()>> {
    match policy::PolicyWatcher::new(path, text) {
        Ok(watcher) => Some(tokio::spawn(policy::watch(
            watcher,
            state.clone(),
            progress.clone(),
            metrics,
            policy::RELOAD_INTERVAL,
        ))),
        Err(e) => {
            warn!("not watching the manifest for SyncPolicy changes: {e}");
            None
        }
    }
}

/// The state of shard `config.shard` of `model` as it starts: restored from
/// its checkpoint directory when it has one, in a new mirror epoch; and the
/// links to its mirrors.
fn open(config: &PsConfig, model: &dyn Model) -> Result<(State, Option<Arc<Links>>), PsError> {
    let mut shard = Shard::new(
        model.layout(),
        config.shard,
        config.shards,
        config.workers,
        config.optimizer,
        config.learning_rate,
        |key, out| model.init_row(key, config.seed, out),
    );
    let (mut mirror, links) = match &config.mirror {
        None => (None, None),
        Some((mirror, addresses)) => {
            let heartbeat = crate::gaia::service::heartbeat(mirror.peer_timeout);
            let links = Links::connect(&mirror.peers, addresses, heartbeat, &config.transport)?;
            let mirror = MirrorState::new(mirror.clone(), shard.values().len(), shard.num_rows());
            (Some(mirror), Some(Arc::new(links)))
        }
    };
    let (durability, stopped) = match &config.checkpoint {
        None => (None, None),
        Some((dir, interval)) => {
            let (durability, stopped) = restore(&mut shard, mirror.as_mut(), dir, *interval)?;
            (Some(durability), stopped)
        }
    };
    if let Some(mirror) = &mut mirror {
        start_epoch(mirror, &shard);
    }
    let state = State {
        shard,
        durability,
        stopped,
        history: Vec::new(),
        bytes_received: 0,
        bytes_sent: 0,
        wan_bytes: 0,
        left: vec![false; config.workers],
        datacenter: config.datacenter.clone(),
        mirror,
    };
    Ok((state, links))
}

/// Serves shard `config.shard` of `model` on `listener` until `shutdown`
/// completes or, with `config.exit_when_done`, until training is done (see
/// [`training_done`]); restores from and writes checkpoints when configured,
/// a final one included.
pub async fn serve(
    config: PsConfig,
    model: &dyn Model,
    listener: TcpListener,
    registry: &Registry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), PsError> {
    let (state, links) = open(&config, model)?;
    let metrics = PsMetrics::new(registry, &config.datacenter, config.shard)?;
    // A restored shard shows its clock before the first push.
    metrics
        .clock
        .set(i64::try_from(state.shard.min_clock()).unwrap_or(i64::MAX));
    let state = Arc::new(Mutex::new(state));
    let progress = Arc::new(watch::Sender::new(Progress::default()));
    let service = Arc::new(ShardService::new(
        state.clone(),
        progress.clone(),
        links.clone(),
        config.consistency,
        config.stopping,
        metrics.clone(),
        config.local_workers.clone(),
    ));
    let metrics_for_links = metrics.clone();
    let watcher = config
        .manifest
        .and_then(|manifest| watch_policy(manifest, &state, &progress, metrics));
    let link_tasks = links
        .as_ref()
        .map(|l| l.start(&state, &progress, &metrics_for_links))
        .unwrap_or_default();
    let mirror_service = MirrorService::new(state.clone(), progress);
    let done = config
        .exit_when_done
        .then(|| training_done(state.clone(), links, config.drain_timeout));
    let shutdown = first_of(shutdown, done);
    // Megabyte pushes must not wait for 64 KiB flow-control windows.
    let (incoming, row_connections) = config.transport.incoming_with_rows(listener);
    let row_transport = tokio::spawn(rows::serve(service.clone(), row_connections));
    let served = tonic::transport::Server::builder()
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(2 * WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .layer(MapResponseLayer::new(too_large_is_resource_exhausted))
        .add_service(
            ParameterServerServer::from_arc(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            MirrorServer::new(mirror_service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    // Closes every row-transport connection: no request is served after
    // the final checkpoint.
    row_transport.abort();
    let _ = row_transport.await;
    served?;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    for task in link_tasks {
        task.abort();
    }
    let mut state = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    state.checkpoint()?;
    info!(
        shard = config.shard,
        min_clock = state.shard.min_clock(),
        "stopped"
    );
    Ok(())
}
