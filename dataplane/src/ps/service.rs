//! The gRPC face of a parameter-server shard: decodes requests at the edge,
//! gates reads by the consistency model, logs and applies pushes (for the
//! row transport, [`super::rows`], as well).

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prost::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use geoml_proto::frame;
use geoml_proto::rows::{Values, unpack_keys};

use super::durability::Durability;
use super::shard::{Consistency, ShardError};
use super::stopping::StoppingRule;
use crate::gaia::service::Links;
use crate::gaia::state::MirrorState;
use crate::metrics::PsMetrics;
use crate::pb;
use crate::pb::parameter_server_server::ParameterServer;
use crate::state::{Progress, State, lock, publish};

/// A parameter-server shard as a gRPC service.
pub struct ShardService {
    state: Arc<Mutex<State>>,
    progress: Arc<watch::Sender<Progress>>,
    links: Option<Arc<Links>>,
    consistency: Consistency,
    stopping: StoppingRule,
    metrics: PsMetrics,
    /// Global indexes of the workers of this shard's own datacenter; the
    /// others reach it over the WAN.
    local_workers: Range<u32>,
    /// Whether pushes go to a write-ahead log (fixed when the shard opens).
    logged: bool,
}

impl ShardService {
    /// Wraps `state`; readers wait on `progress`; `links` reach the mirrors;
    /// workers outside `local_workers` are in other datacenters.
    pub fn new(
        state: Arc<Mutex<State>>,
        progress: Arc<watch::Sender<Progress>>,
        links: Option<Arc<Links>>,
        consistency: Consistency,
        stopping: StoppingRule,
        metrics: PsMetrics,
        local_workers: Range<u32>,
    ) -> Self {
        let logged = {
            let state = lock(&state);
            publish(&state, &progress);
            if let Some(m) = &state.mirror {
                metrics.observe_mirror(&m.status());
            }
            state.durability.is_some()
        };
        Self {
            state,
            progress,
            links,
            consistency,
            stopping,
            metrics,
            local_workers,
            logged,
        }
    }

    /// Counts and logs a refused request.
    pub(crate) fn reject(&self, reason: &str, status: Status) -> Status {
        self.metrics.rejected.with_label_values(&[reason]).inc();
        warn!(reason, message = status.message(), "request rejected");
        status
    }

    /// Counts a request of `worker` and its response.
    fn count(&self, state: &mut State, worker: u32, received: usize, sent: usize) {
        state.bytes_received += received as u64;
        state.bytes_sent += sent as u64;
        self.metrics.bytes_received.inc_by(received as u64);
        self.metrics.bytes_sent.inc_by(sent as u64);
        if !self.local_workers.contains(&worker) {
            let both = (received + sent) as u64;
            state.wan_bytes += both;
            self.metrics.wan_bytes.inc_by(both);
        }
    }

    /// Publishes the clock after a change and stops on the clock budget;
    /// queues what became significant for the mirrors (logged first).
    fn advance(&self, state: &mut State) -> Result<(), Status> {
        let min_clock = state.shard.min_clock();
        self.metrics
            .clock
            .set(i64::try_from(min_clock).unwrap_or(i64::MAX));
        if state.stopped.is_none() {
            state.stopped = self.stopping.on_clock(min_clock);
        }
        if let (
            Some(links),
            State {
                shard,
                mirror: Some(mirror),
                stopped,
                ..
            },
        ) = (&self.links, &mut *state)
        {
            let record = mirror.on_clock(
                shard.values(),
                min_clock,
                stopped.is_some(),
                &links.backlog(),
                Instant::now(),
            );
            if let Some(record) = record {
                state.mirror_step(&record).map_err(Status::from)?;
            }
            links.wake();
            if let Some(mirror) = &state.mirror {
                self.metrics.observe_mirror(&mirror.status());
            }
        }
        publish(state, &self.progress);
        Ok(())
    }

    /// Waits until the mirrors let a worker at `clock` read `rows`: the
    /// mirror-clock bound (or averaging round), then the selective barrier.
    async fn wait_for_mirrors(&self, clock: u64, rows: &[usize]) -> Result<(), Status> {
        let shutting_down = |_| Status::unavailable("parameter server is shutting down");
        let mut progress = self.progress.subscribe();
        let started = Instant::now();
        let held = progress.borrow_and_update().read_limit < clock;
        if held {
            progress
                .wait_for(|p| p.stopped || clock <= p.read_limit)
                .await
                .map_err(shutting_down)?;
        }
        let (first, barrier) = (started.elapsed(), Instant::now());
        let (mut held_again, mut blocked) = (false, false);
        loop {
            {
                let mut state = lock(&self.state);
                let stopped = state.stopped.is_some();
                let Some(m) = state.mirror.as_mut() else {
                    return Ok(());
                };
                // The limit may have fallen since it was published (a peer
                // heard from again, a round trip measured): checked again
                // here, so that no read goes past the bound.
                let over = !stopped && clock > m.read_limit();
                if !over && (stopped || !m.blocked(rows)) {
                    if held || held_again {
                        let waited = if held_again { started.elapsed() } else { first };
                        m.stats.clock_blocks += 1;
                        m.stats.clock_wait += waited.as_secs_f64();
                    }
                    if blocked {
                        m.stats.barrier_blocks += 1;
                        m.stats.barrier_wait += barrier.elapsed().as_secs_f64();
                    }
                    if !stopped {
                        m.stats.max_skew = m.stats.max_skew.max(m.skew(clock));
                    }
                    return Ok(());
                }
                held_again |= over;
                blocked |= !over;
            }
            progress.changed().await.map_err(shutting_down)?;
        }
    }
}

impl From<ShardError> for Status {
    fn from(e: ShardError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// The keys of `rows` (`None` for all), checked.
fn requested_keys(rows: Option<&pb::Rows>) -> Result<Option<Vec<u32>>, Status> {
    let rows = rows.ok_or_else(|| Status::invalid_argument("rows: missing"))?;
    if rows.all {
        if !rows.keys.is_empty() {
            return Err(Status::invalid_argument("rows: keys given with all = true"));
        }
        return Ok(None);
    }
    Ok(Some(unpack_keys(&rows.keys)?))
}

/// The transport a request came over, which decides what its reply's bytes
/// count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// gRPC: the encoded message.
    Grpc,
    /// The row transport: the frame ([`geoml_proto::frame`]).
    Rows,
}

impl Wire {
    fn pull_reply_bytes(self, response: &pb::PullResponse) -> usize {
        match self {
            Wire::Grpc => response.encoded_len(),
            Wire::Rows => {
                frame::HEADER_BYTES
                    + response
                        .rows
                        .as_ref()
                        .map_or(0, |r| r.keys.len() + r.values.len())
            }
        }
    }

    fn push_reply_bytes(self, response: &pb::PushResponse) -> usize {
        match self {
            Wire::Grpc => response.encoded_len(),
            Wire::Rows => frame::HEADER_BYTES,
        }
    }
}

impl ShardService {
    /// Answers a pull of `received` bytes that came over `wire`, once the
    /// consistency model (and the mirrors) let the worker read.
    pub(crate) async fn pull_rows(
        &self,
        req: pb::PullRequest,
        received: usize,
        wire: Wire,
    ) -> Result<pb::PullResponse, Status> {
        let keys = requested_keys(req.rows.as_ref()).map_err(|s| self.reject("malformed", s))?;
        if req.rows.as_ref().is_some_and(|r| !r.values.is_empty()) {
            return Err(self.reject(
                "malformed",
                Status::invalid_argument("rows: a pull sends no values"),
            ));
        }
        let local_rows = {
            let state = lock(&self.state);
            state
                .shard
                .check_worker(req.worker)
                .map_err(|e| self.reject("unknown_worker", e.into()))?;
            if let Some(keys) = &keys
                && keys.len() > state.shard.keys().len()
            {
                return Err(self.reject(
                    "too_large",
                    Status::resource_exhausted(format!(
                        "rows: {} keys asked for, the shard has {}",
                        keys.len(),
                        state.shard.keys().len()
                    )),
                ));
            }
            state
                .shard
                .rows_of(keys.as_deref())
                .map_err(|e| self.reject("unknown_key", e.into()))?
        };

        let waited = Instant::now();
        let consistency = self.consistency;
        let clock = req.clock;
        self.progress
            .subscribe()
            .wait_for(|p| p.stopped || consistency.can_read(clock, p.min_clock))
            .await
            .map_err(|_| Status::unavailable("parameter server is shutting down"))?;
        self.metrics
            .read_wait_seconds
            .inc_by(waited.elapsed().as_secs_f64());
        self.wait_for_mirrors(clock, &local_rows).await?;

        let mut state = lock(&self.state);
        let values = state
            .shard
            .read_bytes(keys.as_deref())
            .map_err(|e| self.reject("unknown_key", e.into()))?;
        // The keys were checked: they go back as they came (empty for all).
        let echoed = req.rows.map(|r| r.keys).unwrap_or_default();
        let response = pb::PullResponse {
            rows: Some(pb::Rows {
                keys: echoed,
                values,
                all: keys.is_none(),
            }),
            min_clock: state.shard.min_clock(),
            stop: state.stopped.is_some(),
            target_met: state
                .mirror
                .as_ref()
                .is_some_and(MirrorState::target_met_anywhere),
        };
        let sent = wire.pull_reply_bytes(&response);
        self.count(&mut state, req.worker, received, sent);
        Ok(response)
    }

    /// Checks, logs and applies a push of `received` bytes that came over
    /// `wire`; acknowledged only once it is in the write-ahead log.
    pub(crate) fn push_rows(
        &self,
        req: &pb::PushRequest,
        received: usize,
        wire: Wire,
    ) -> Result<pb::PushResponse, Status> {
        let keys =
            requested_keys(req.gradient.as_ref()).map_err(|s| self.reject("malformed", s))?;
        // Read in place from the received buffer, never unpacked.
        let values = Values::new(req.gradient.as_ref().map_or(&[][..], |g| &g.values))
            .map_err(|e| self.reject("malformed", e.into()))?;
        // The log record is framed before the lock is taken (a `Bytes`
        // clone of the payload, one copy into the frame); only the append
        // itself happens under the lock, to keep the log in apply order.
        let record = if self.logged {
            Some(
                Durability::frame(&pb::WalRecord {
                    record: Some(pb::wal_record::Record::Push(req.clone())),
                })
                .map_err(|e| Status::internal(format!("write-ahead log: {e}")))?,
            )
        } else {
            None
        };

        let mut state = lock(&self.state);
        let rows = state
            .shard
            .check(req.worker, req.clock, keys.as_deref(), values)
            .map_err(|e| self.reject("invalid_update", e.into()))?;
        if let Some(rows) = rows {
            // Logged before it is applied and acknowledged.
            if let (Some(durability), Some(record)) = (&mut state.durability, &record) {
                durability
                    .append(record)
                    .map_err(|e| Status::internal(format!("write-ahead log: {e}")))?;
            }
            let State { shard, mirror, .. } = &mut *state;
            shard.commit(
                req.worker,
                req.clock,
                &rows,
                values,
                mirror.as_mut().map(|m| &mut m.changes),
            );
            self.metrics.updates_applied.inc();
            self.advance(&mut state)?;
            let min_clock = state.shard.min_clock();
            if state.durability.as_ref().is_some_and(|d| d.due(min_clock)) {
                state
                    .checkpoint()
                    .map_err(|e| Status::internal(format!("checkpoint: {e}")))?;
            }
        } else {
            self.metrics.updates_duplicate.inc();
        }
        let response = pb::PushResponse {
            min_clock: state.shard.min_clock(),
            stop: state.stopped.is_some(),
        };
        let sent = wire.push_reply_bytes(&response);
        self.count(&mut state, req.worker, received, sent);
        Ok(response)
    }
}

#[tonic::async_trait]
impl ParameterServer for ShardService {
    #[instrument(skip_all, fields(worker = request.get_ref().worker, clock = request.get_ref().clock))]
    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let received = request.get_ref().encoded_len();
        self.pull_rows(request.into_inner(), received, Wire::Grpc)
            .await
            .map(Response::new)
    }

    #[instrument(skip_all, fields(worker = request.get_ref().worker, clock = request.get_ref().clock))]
    async fn push(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let received = request.get_ref().encoded_len();
        self.push_rows(request.get_ref(), received, Wire::Grpc)
            .map(Response::new)
    }

    #[instrument(skip_all, fields(worker = request.get_ref().worker, clock = request.get_ref().clock))]
    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let req = request.into_inner();
        if !req.metric.is_finite() {
            return Err(self.reject("malformed", Status::invalid_argument("metric: not finite")));
        }
        let mut state = lock(&self.state);
        state
            .shard
            .check_worker(req.worker)
            .map_err(|e| self.reject("unknown_worker", e.into()))?;
        self.metrics.metric.set(req.metric);
        self.metrics
            .metric_clock
            .set(i64::try_from(req.clock).unwrap_or(i64::MAX));
        state.history.push(pb::MetricPoint {
            unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            clock: req.clock,
            metric: req.metric,
        });
        if state.stopped.is_none() {
            state.stopped = self.stopping.on_report(req.metric, req.model_change);
            // A datacenter that met the target trains on until its peers have.
            if state.stopped.is_some()
                && self.stopping.reached_target(req.metric)
                && let Some(m) = state.mirror.as_mut()
                && !m.target_reached()
            {
                state.stopped = None;
            }
            self.advance(&mut state)?;
        }
        Ok(Response::new(pb::ReportResponse {
            stop: state.stopped.is_some(),
            reason: state.stopped.clone().unwrap_or_default(),
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let state = lock(&self.state);
        Ok(Response::new(pb::StatusResponse {
            min_clock: state.shard.min_clock(),
            worker_clocks: state.shard.worker_clocks().to_vec(),
            stopped: state.stopped.is_some(),
            stop_reason: state.stopped.clone().unwrap_or_default(),
            metrics: state.history.clone(),
            bytes_received: state.bytes_received,
            bytes_sent: state.bytes_sent,
            updates_applied: state.shard.updates_applied(),
            shard: state.shard.id(),
            datacenter: state.datacenter.clone(),
            mirror: state
                .mirror
                .as_ref()
                .map(crate::gaia::state::MirrorState::status),
            wan_bytes: state.wan_bytes,
            workers_left: u32::try_from(state.left.iter().filter(|&&l| l).count())
                .unwrap_or(u32::MAX),
        }))
    }

    #[instrument(skip_all, fields(worker = request.get_ref().worker))]
    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let worker = request.into_inner().worker;
        let mut state = lock(&self.state);
        state
            .shard
            .check_worker(worker)
            .map_err(|e| self.reject("unknown_worker", e.into()))?;
        if let Some(left) = state.left.get_mut(worker as usize)
            && !*left
        {
            *left = true;
            info!(worker, "worker left");
        }
        Ok(Response::new(pb::LeaveResponse {}))
    }
}
