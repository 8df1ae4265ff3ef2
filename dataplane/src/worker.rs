//! A worker: owns a partition of the training data; every iteration it pulls
//! its working set from the parameter servers, computes a gradient on a
//! mini-batch and pushes it. One worker per model also evaluates on held-out
//! data and reports to its shards, which apply the stopping rule.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::Retryable;
use futures::future::try_join_all;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tonic::Status;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::data::{DataSet, Examples};
use crate::metrics::WorkerMetrics;
use crate::model::{Layout, Model, WorkingSet};
use crate::pb;
use crate::pb::parameter_server_client::ParameterServerClient;
use crate::ps::rows::RowClient;
use crate::retry;
use crate::tls::{Expect, Transport};
use geoml_crds::identity::Role;
use geoml_proto::rows::Values;
use geoml_proto::{MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, WINDOW_BYTES};

/// Everything a worker needs to know.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Index of this worker among the workers of its shards.
    pub index: u32,
    /// Whether this worker evaluates the model and reports to its shards.
    pub evaluates: bool,
    /// Addresses of the parameter-server shards, `http://host:port`, in shard order.
    pub parameter_servers: Vec<String>,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// When to evaluate (if this worker evaluates).
    pub evaluation: EvalSchedule,
    /// How long to keep retrying an unreachable parameter server.
    pub retry_for: Duration,
    /// How to reach the parameter servers: mTLS or plaintext.
    pub transport: Transport,
}

/// When an evaluating worker evaluates: every `every` clocks, and when
/// training stops. With mirrors and a target in the job the datacenters
/// take turns ([`crate::placement::RolePlace::eval_turns`]; datacenter
/// `turn` of `turns` evaluates at every `turns`-th of those clocks) until one
/// met the target, which their shards tell the workers; from then on each
/// evaluates every `every` clocks. Emulated datacenters share the machine's
/// cores, so evaluations in turn cost what one model's evaluation costs; the
/// first model to meet the target is seen up to `turns × every` clocks late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalSchedule {
    /// Clocks between chances to evaluate.
    pub every: u64,
    /// This datacenter's turn, below `turns`.
    pub turn: u64,
    /// Datacenters taking turns (1: none).
    pub turns: u64,
}

impl EvalSchedule {
    /// Every `every` clocks, without turns.
    #[must_use]
    pub fn every(every: u64) -> Self {
        Self {
            every,
            turn: 0,
            turns: 1,
        }
    }

    /// Whether to evaluate at `clock`, once `target_met` says whether any
    /// datacenter met the target.
    #[must_use]
    pub fn due(&self, clock: u64, target_met: bool) -> bool {
        let every = self.every.max(1);
        clock.is_multiple_of(every)
            && (target_met || (clock / every) % self.turns.max(1) == self.turn)
    }
}

/// How a worker's training ended.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSummary {
    /// Iterations completed.
    pub clock: u64,
    /// Last evaluation metric, if this worker evaluates.
    pub metric: Option<f64>,
}

/// What can stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A parameter-server address is invalid.
    #[error("parameter server address {address}: {source}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A parameter server refused a request or stayed unreachable.
    #[error("parameter server {shard}: {status}")]
    Rpc {
        /// The shard.
        shard: usize,
        /// Its answer.
        status: Status,
    },
    /// A response does not fit the model.
    #[error("parameter server {shard} sent {got} values, expected {expected}")]
    Shape {
        /// The shard.
        shard: usize,
        /// Values expected.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// The data partition is empty.
    #[error("worker {0} has no training examples")]
    NoData(u32),
}

/// Connects to every shard (lazily: the first request dials, and a
/// restarted server is dialled again).
pub fn connect(
    addresses: &[String],
    transport: &Transport,
) -> Result<Vec<ParameterServerClient<Channel>>, WorkerError> {
    addresses
        .iter()
        .map(|address| {
            let endpoint = transport
                .endpoint(address)
                .map_err(|source| WorkerError::Address {
                    address: address.clone(),
                    source,
                })?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .initial_stream_window_size(WINDOW_BYTES)
                .initial_connection_window_size(2 * WINDOW_BYTES)
                .max_frame_size(MAX_FRAME_BYTES);
            let channel = transport.lazy(&endpoint, &Expect::role(Role::ParameterServer));
            Ok(ParameterServerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES))
        })
        .collect()
}

/// Calls `f` until it succeeds, retrying with backoff while the server is
/// unreachable, for at most `retry_for`.
async fn retry<T, F, Fut>(shard: usize, retry_for: Duration, f: F) -> Result<T, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + retry_for;
    f.retry(retry::backoff(Duration::from_secs(1)))
        .when(|status| retry::unreachable(status) && Instant::now() < deadline)
        .notify(|status, _| warn!(shard, %status, "parameter server unreachable; retrying"))
        .await
        .map_err(|status| WorkerError::Rpc { shard, status })
}

/// Keys of `working_set` owned by each of `shards` shards (`None`: all).
fn split_keys(working_set: &WorkingSet, shards: usize) -> Vec<Option<Vec<u32>>> {
    match working_set {
        WorkingSet::All => vec![None; shards],
        WorkingSet::Rows(keys) => {
            let mut split = vec![Vec::new(); shards];
            for &k in keys {
                split[k as usize % shards].push(k);
            }
            split.into_iter().map(Some).collect()
        }
    }
}

/// The keys shard `shard` of `shards` owns, or `keys` when given.
fn shard_keys(layout: &Layout, shard: usize, shards: usize, keys: Option<&[u32]>) -> Vec<u32> {
    keys.map_or_else(
        || {
            (0..u32::try_from(layout.num_rows()).unwrap_or(u32::MAX))
                .filter(|k| *k as usize % shards == shard)
                .collect()
        },
        <[u32]>::to_vec,
    )
}

/// A worker's connection to its parameter servers and its copy of the model.
struct Session<'a> {
    model: &'a dyn Model,
    /// gRPC, for every call but pushes and pulls.
    clients: Vec<ParameterServerClient<Channel>>,
    /// The row transport, for pushes and pulls, in shard order.
    rows: Vec<RowClient>,
    config: &'a WorkerConfig,
    params: Vec<f32>,
    /// A shard said this datacenter or a peer met the target.
    target_met: bool,
}

impl<'a> Session<'a> {
    fn connect(config: &'a WorkerConfig, model: &'a dyn Model) -> Result<Self, WorkerError> {
        Ok(Session {
            model,
            clients: connect(&config.parameter_servers, &config.transport)?,
            rows: config
                .parameter_servers
                .iter()
                .map(|address| RowClient::new(address, &config.transport))
                .collect(),
            config,
            params: vec![0.0; model.layout().len()],
            target_met: false,
        })
    }

    /// Pulls the rows of `working_set` at `clock` into `params`; true when
    /// training has stopped.
    async fn pull(&mut self, clock: u64, working_set: &WorkingSet) -> Result<bool, WorkerError> {
        let shards = self.rows.len();
        let split = split_keys(working_set, shards);
        let worker = self.config.index;
        let calls = split.iter().enumerate().map(|(shard, keys)| {
            let client = &self.rows[shard];
            retry(shard, self.config.retry_for, move || {
                client.pull(worker, clock, keys.as_deref())
            })
        });
        let responses = try_join_all(calls).await?;
        let layout = self.model.layout();
        let mut stop = false;
        for (shard, response) in responses.into_iter().enumerate() {
            stop |= response.stop;
            self.target_met |= response.target_met;
            let rows = response.rows.unwrap_or_default();
            // Copied straight from the received buffer into the rows.
            let values = Values::new(&rows.values).map_err(|e| WorkerError::Rpc {
                shard,
                status: Status::internal(e.to_string()),
            })?;
            let keys = shard_keys(layout, shard, shards, split[shard].as_deref());
            let mut at = 0;
            for key in keys {
                let Some(range) = layout.row(key) else {
                    continue;
                };
                let Some(row) = values.get(at..at + range.len()) else {
                    return Err(WorkerError::Shape {
                        shard,
                        expected: at + range.len(),
                        got: values.len(),
                    });
                };
                at += range.len();
                row.copy_to(&mut self.params[range]);
            }
        }
        Ok(stop)
    }

    /// Pushes `gradient` as iteration `clock` to every shard; true when
    /// training has stopped.
    async fn push(
        &mut self,
        clock: u64,
        keys: Option<&[u32]>,
        values: &[f32],
    ) -> Result<bool, WorkerError> {
        let shards = self.rows.len();
        let worker = self.config.index;
        if shards == 1 {
            // One shard owns every row, in the gradient's order: sent as it is.
            let client = &self.rows[0];
            let values = Values::of(values);
            let response = retry(0, self.config.retry_for, || {
                client.push(worker, clock, keys, values)
            })
            .await?;
            return Ok(response.stop);
        }
        let layout = self.model.layout();
        // Each shard's values packed once, straight from the gradient.
        let mut per_shard: Vec<(Vec<u32>, Vec<f32>)> = (0..shards)
            .map(|_| (Vec::new(), Vec::with_capacity(values.len() / shards)))
            .collect();
        let mut at = 0;
        for key in shard_keys(layout, 0, 1, keys) {
            let width = layout.row(key).map_or(0, |r| r.len());
            let (shard_keys, shard_values) = &mut per_shard[key as usize % shards];
            shard_keys.push(key);
            shard_values.extend_from_slice(&values[at..at + width]);
            at += width;
        }
        let calls = per_shard
            .iter()
            .enumerate()
            .map(|(shard, (shard_keys, shard_values))| {
                let client = &self.rows[shard];
                let keys = keys.map(|_| &shard_keys[..]);
                let values = Values::of(shard_values);
                retry(shard, self.config.retry_for, move || {
                    client.push(worker, clock, keys, values)
                })
            });
        Ok(try_join_all(calls).await?.iter().any(|r| r.stop))
    }

    /// Tells every shard this worker stopped and sends nothing more (shards
    /// exit once all their workers left). Best effort: a shard that cannot
    /// be told gives up waiting on its own.
    async fn leave(&self) {
        let calls = self.clients.iter().enumerate().map(|(shard, client)| {
            let request = pb::LeaveRequest {
                worker: self.config.index,
            };
            retry(shard, self.config.retry_for, move || {
                let mut client = client.clone();
                async move { client.leave(request).await.map(tonic::Response::into_inner) }
            })
        });
        for result in futures::future::join_all(calls).await {
            if let Err(e) = result {
                warn!(worker = self.config.index, "could not say it left: {e}");
            }
        }
    }

    /// The clock this worker resumes from: the lowest any shard recorded for it.
    async fn resume_clock(&mut self) -> Result<u64, WorkerError> {
        let index = self.config.index as usize;
        let mut clock = u64::MAX;
        for (shard, client) in self.clients.iter().enumerate() {
            let status = retry(shard, self.config.retry_for, || {
                let mut client = client.clone();
                async move {
                    client
                        .status(pb::StatusRequest {})
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
            clock = clock.min(status.worker_clocks.get(index).copied().unwrap_or(0));
        }
        Ok(if clock == u64::MAX { 0 } else { clock })
    }
}

/// Relative change `‖a − b‖ / ‖b‖`.
fn relative_change(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0_f64, 0.0_f64);
    for (x, y) in a.iter().zip(b) {
        diff += f64::from(x - y).powi(2);
        norm += f64::from(*y).powi(2);
    }
    if norm == 0.0 {
        f64::INFINITY
    } else {
        (diff / norm).sqrt()
    }
}

/// The model that `parameter_servers` (one model's shards, in shard order)
/// hold once training stopped, read as a worker reads it.
pub async fn final_model(
    parameter_servers: &[String],
    transport: &Transport,
    model: &dyn Model,
) -> Result<Vec<f32>, WorkerError> {
    let config = WorkerConfig {
        index: 0,
        evaluates: false,
        parameter_servers: parameter_servers.to_vec(),
        batch_size: 1,
        seed: 0,
        evaluation: EvalSchedule::every(1),
        retry_for: Duration::ZERO,
        transport: transport.clone(),
    };
    let mut session = Session::connect(&config, model)?;
    // Training has stopped, so any clock may read.
    session.pull(u64::MAX, &WorkingSet::All).await?;
    Ok(session.params)
}

/// Trains on the examples `partition` of `data.train` until a parameter
/// server says training has stopped.
pub async fn run(
    config: &WorkerConfig,
    model: &dyn Model,
    data: &DataSet,
    partition: Vec<usize>,
    metrics: &WorkerMetrics,
) -> Result<WorkerSummary, WorkerError> {
    if partition.is_empty() {
        return Err(WorkerError::NoData(config.index));
    }
    let mut session = Session::connect(config, model)?;
    let mut clock = session.resume_clock().await?;
    info!(
        worker = config.index,
        clock,
        examples = partition.len(),
        "training"
    );
    let mut rng =
        StdRng::seed_from_u64(config.seed ^ u64::from(config.index).wrapping_mul(0x9e37_79b9));
    let mut order = partition;
    let mut position = order.len();
    let mut previous: Option<Vec<f32>> = None;
    let mut metric = None;
    loop {
        if position >= order.len() {
            order.shuffle(&mut rng);
            position = 0;
        }
        let end = (position + config.batch_size).min(order.len());
        let batch: Examples = data.train.select(&order[position..end]);
        position = end;

        let started = Instant::now();
        let working_set = model.working_set(&batch);
        let mut stop = session.pull(clock, &working_set).await?;
        let pulled = started.elapsed();
        let update = model.gradient(&session.params, &batch);
        let computed = started.elapsed();
        stop |= session
            .push(clock + 1, update.keys.as_deref(), &update.values)
            .await?;
        clock += 1;
        metrics
            .compute_seconds
            .inc_by(computed.saturating_sub(pulled).as_secs_f64());
        metrics
            .communication_seconds
            .inc_by((started.elapsed().saturating_sub(computed) + pulled).as_secs_f64());
        metrics.clock.set(i64::try_from(clock).unwrap_or(i64::MAX));

        if config.evaluates && (stop || config.evaluation.due(clock, session.target_met)) {
            stop |= session.pull(clock, &WorkingSet::All).await?;
            let evaluating = Instant::now();
            let value = model.evaluate(&session.params, &data.test);
            let seconds = evaluating.elapsed().as_secs_f64();
            let change = previous
                .as_ref()
                .map_or(f64::INFINITY, |p| relative_change(&session.params, p));
            previous = Some(session.params.clone());
            metric = Some(value);
            metrics.metric.set(value);
            info!(
                clock,
                metric = value,
                model_change = change,
                seconds,
                "evaluated"
            );
            // Every shard applies the stopping rule, so all stop together and
            // no worker is left waiting on a shard that did not hear of it.
            let report = pb::ReportRequest {
                worker: config.index,
                clock,
                metric: value,
                model_change: change,
            };
            let calls = session.clients.iter().enumerate().map(|(shard, client)| {
                retry(shard, config.retry_for, move || {
                    let mut client = client.clone();
                    async move { client.report(report).await.map(tonic::Response::into_inner) }
                })
            });
            let responses = try_join_all(calls).await?;
            stop |= responses.iter().any(|r| r.stop);
        }
        if stop {
            info!(worker = config.index, clock, "stopping");
            session.leave().await;
            return Ok(WorkerSummary { clock, metric });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EvalSchedule;

    fn due_clocks(schedule: EvalSchedule, target_met: bool) -> Vec<u64> {
        (1..=140).filter(|&c| schedule.due(c, target_met)).collect()
    }

    #[test]
    fn datacenters_take_turns_until_the_target_was_met_anywhere() {
        let second_of_three = EvalSchedule {
            every: 20,
            turn: 1,
            turns: 3,
        };
        assert_eq!(due_clocks(second_of_three, false), [20, 80, 140]);
        assert_eq!(
            due_clocks(second_of_three, true),
            [20, 40, 60, 80, 100, 120, 140]
        );
        let first_of_three = EvalSchedule {
            turn: 0,
            ..second_of_three
        };
        assert_eq!(due_clocks(first_of_three, false), [60, 120]);
        assert_eq!(
            due_clocks(EvalSchedule::every(20), false),
            [20, 40, 60, 80, 100, 120, 140]
        );
    }
}
