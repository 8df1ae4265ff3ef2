//! `geoml bench`: push+apply and pull throughput of a parameter-server
//! shard, dense and sparse, next to raw loopback TCP measured in the same run.
//!
//! Pushes and pulls go over the row transport, as a worker's do
//! ([`geoml_dataplane::ps::rows`]).
//!
//! Every timed loop does what a worker does per message: pack its `f32`
//! gradient (and keys) into the request, and copy pulled values into its
//! `f32` parameters. Nothing is prepared outside the timed section except
//! the gradient itself. Each pattern is paired with raw TCP carrying the
//! same exchanges (a push: its bytes out, one byte back; a pull: one byte
//! out, its bytes back; a clock: a pull, then a push), measured right
//! before it: on a shared machine raw loopback speed drifts by 2× within a
//! run. Both are the best of [`REPEATS`] back-to-back measurements, so a
//! moment of contention from other processes counts against neither.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use geoml_dataplane::data::Examples;
use geoml_dataplane::model::{Layout, Model, TensorShape, Update, WorkingSet};
use geoml_dataplane::ps::rows::RowClient;
use geoml_dataplane::ps::shard::Consistency;
use geoml_dataplane::ps::stopping::StoppingRule;
use geoml_dataplane::ps::{self, PsConfig};
use geoml_dataplane::tls::Transport;
use geoml_proto::rows::Values;

/// A model that is only a layout: the benchmark pushes synthetic gradients.
struct Synthetic(Layout);

impl Model for Synthetic {
    fn layout(&self) -> &Layout {
        &self.0
    }
    fn init_row(&self, _: u32, _: u64, out: &mut [f32]) {
        out.fill(0.0);
    }
    fn working_set(&self, _: &Examples) -> WorkingSet {
        WorkingSet::All
    }
    fn gradient(&self, _: &[f32], _: &Examples) -> Update {
        Update {
            keys: None,
            values: Vec::new(),
        }
    }
    fn metric_name(&self) -> &'static str {
        "none"
    }
    fn higher_is_better(&self) -> bool {
        true
    }
    fn evaluate(&self, _: &[f32], _: &Examples) -> f64 {
        0.0
    }
}

/// One measured transfer pattern.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Throughput {
    /// What was sent.
    pub name: String,
    /// Payload bytes per message (per clock for push+pull).
    pub message_bytes: usize,
    /// Messages sent (clocks for push+pull).
    pub messages: usize,
    /// Payload megabytes per second.
    pub mb_per_second: f64,
    /// Raw TCP carrying the same exchanges, measured right before, in
    /// megabytes per second.
    pub raw_mb_per_second: f64,
    /// `mb_per_second / raw_mb_per_second`.
    pub ratio_to_raw: f64,
}

impl Throughput {
    fn new(
        name: &str,
        message_bytes: usize,
        messages: usize,
        raw_mb_per_second: f64,
        mb_per_second: f64,
    ) -> Self {
        Self {
            name: name.to_owned(),
            message_bytes,
            messages,
            mb_per_second,
            raw_mb_per_second,
            ratio_to_raw: mb_per_second / raw_mb_per_second,
        }
    }
}

/// Results of one benchmark run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// Pushes, pulls, push+pull per clock, each with its raw TCP figure.
    pub results: Vec<Throughput>,
}

impl BenchReport {
    /// The results as a table with ratios against raw TCP.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<40} {:>9} {:>9} {:>11} {:>7}\n",
            "transfer", "message", "MB/s", "raw TCP MB/s", "vs raw"
        );
        for r in &self.results {
            let _ = writeln!(
                out,
                "{:<40} {:>9} {:>9.1} {:>11.1} {:>6.0}%",
                r.name,
                crate::report::human_bytes(r.message_bytes as u64),
                r.mb_per_second,
                r.raw_mb_per_second,
                100.0 * r.ratio_to_raw
            );
        }
        out
    }
}

fn rate(bytes: usize, messages: usize, elapsed: Duration) -> f64 {
    #[allow(clippy::cast_precision_loss)] // a rate for display
    let total = (bytes * messages) as f64;
    total / elapsed.as_secs_f64() / 1e6
}

/// A push: `bytes` out, one byte back, like a unary RPC.
fn push(bytes: usize) -> (usize, usize) {
    (bytes, 1)
}

/// A pull: one byte out, `bytes` back.
fn pull(bytes: usize) -> (usize, usize) {
    (1, bytes)
}

/// Raw TCP carrying `exchanges` (request and response sizes, in order)
/// `messages` times, the best of [`REPEATS`]; MB/s of all their bytes.
async fn raw_tcp(exchanges: &[(usize, usize)], messages: usize) -> std::io::Result<f64> {
    let mut best = 0.0_f64;
    for _ in 0..REPEATS {
        best = best.max(raw_tcp_once(exchanges, messages).await?);
    }
    Ok(best)
}

async fn raw_tcp_once(exchanges: &[(usize, usize)], messages: usize) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let largest = exchanges.iter().map(|&(a, b)| a.max(b)).max().unwrap_or(0);
    let answers = exchanges.to_vec();
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let (mut buffer, payload) = (vec![0; largest], vec![1_u8; largest]);
        for _ in 0..messages {
            for &(request, response) in &answers {
                socket.read_exact(&mut buffer[..request]).await?;
                socket.write_all(&payload[..response]).await?;
            }
        }
        std::io::Result::Ok(())
    });
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let (mut buffer, payload) = (vec![0; largest], vec![7_u8; largest]);
    let started = Instant::now();
    for _ in 0..messages {
        for &(request, response) in exchanges {
            socket.write_all(&payload[..request]).await?;
            socket.read_exact(&mut buffer[..response]).await?;
        }
    }
    let elapsed = started.elapsed();
    server.await.map_err(std::io::Error::other)??;
    let bytes = exchanges.iter().map(|&(a, b)| a.max(b)).sum();
    Ok(rate(bytes, messages, elapsed))
}

/// What the benchmark measures, once set up.
struct Bench {
    /// The shard's address.
    address: String,
    client: RowClient,
    width: usize,
    messages: usize,
    /// Clock of every benchmark worker.
    clocks: Vec<u64>,
    /// The worker's copy of the parameters, where pulls land.
    params: Vec<f32>,
}

/// Why a benchmark run failed.
type BenchError = Box<dyn std::error::Error>;

impl Bench {
    /// A push of `gradient` for `keys` (`None`: all rows) as `worker`'s
    /// next clock, sent as a worker with one shard sends it.
    async fn push(
        &mut self,
        worker: u32,
        keys: Option<&[u32]>,
        gradient: &[f32],
    ) -> Result<(), BenchError> {
        let clock = &mut self.clocks[worker as usize];
        *clock += 1;
        self.client
            .push(worker, *clock, keys, Values::of(gradient))
            .await?;
        Ok(())
    }

    /// Pulls `keys` (`None`: all rows) into the parameters.
    async fn pull(&mut self, keys: Option<&[u32]>) -> Result<(), BenchError> {
        let response = self.client.pull(0, self.clocks[0], keys).await?;
        let rows = response.rows.unwrap_or_default();
        let values = Values::new(&rows.values)?;
        let copied = match keys {
            None => values.copy_to(&mut self.params),
            Some(keys) => keys.iter().enumerate().all(|(i, &key)| {
                let at = key as usize * self.width;
                values
                    .get(i * self.width..(i + 1) * self.width)
                    .is_some_and(|row| row.copy_to(&mut self.params[at..at + self.width]))
            }),
        };
        if copied {
            Ok(())
        } else {
            Err(format!(
                "pull: {} values do not fit the rows asked for",
                values.len()
            )
            .into())
        }
    }

    /// Pushes `gradient` for `keys` `messages` times; MB/s of payload,
    /// the best of [`REPEATS`].
    async fn pushes(&mut self, keys: Option<&[u32]>, gradient: &[f32]) -> Result<f64, BenchError> {
        let bytes = 4 * (keys.map_or(0, <[u32]>::len) + gradient.len());
        let mut best = 0.0_f64;
        for _ in 0..REPEATS {
            let started = Instant::now();
            for _ in 0..self.messages {
                self.push(0, keys, gradient).await?;
            }
            best = best.max(rate(bytes, self.messages, started.elapsed()));
        }
        Ok(best)
    }

    /// Pulls `keys` `messages` times; MB/s of payload (values and keys),
    /// the best of [`REPEATS`].
    async fn pulls(&mut self, keys: Option<&[u32]>) -> Result<f64, BenchError> {
        let floats = keys.map_or(self.params.len(), |k| k.len() * self.width);
        let bytes = 4 * (keys.map_or(0, <[u32]>::len) + floats);
        let mut best = 0.0_f64;
        for _ in 0..REPEATS {
            let started = Instant::now();
            for _ in 0..self.messages {
                self.pull(keys).await?;
            }
            best = best.max(rate(bytes, self.messages, started.elapsed()));
        }
        Ok(best)
    }

    /// A worker's clock, dense: pull every row, then push a gradient for
    /// every row; MB/s of both payloads, the best of [`REPEATS`].
    async fn clocks(&mut self, gradient: &[f32]) -> Result<f64, BenchError> {
        let mut best = 0.0_f64;
        for _ in 0..REPEATS {
            let started = Instant::now();
            for _ in 0..self.messages {
                self.pull(None).await?;
                self.push(0, None, gradient).await?;
            }
            best = best.max(rate(8 * gradient.len(), self.messages, started.elapsed()));
        }
        Ok(best)
    }

    /// Dense pushes from `workers` workers at once (a connection each, their
    /// requests in flight together), `messages` in all; MB/s of payload,
    /// the best of [`REPEATS`].
    async fn concurrent_pushes(
        &mut self,
        workers: u32,
        gradient: &[f32],
    ) -> Result<f64, BenchError> {
        let each = self.messages / workers as usize;
        let mut best = 0.0_f64;
        for _ in 0..REPEATS {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for worker in 0..workers {
                let client = RowClient::new(&self.address, &Transport::Plaintext);
                let first = self.clocks[worker as usize];
                let gradient = gradient.to_vec();
                tasks.spawn(async move {
                    for clock in first + 1..=first + each as u64 {
                        client
                            .push(worker, clock, None, Values::of(&gradient))
                            .await?;
                    }
                    Ok::<_, tonic::Status>(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            let elapsed = started.elapsed();
            for clock in &mut self.clocks {
                *clock += each as u64;
            }
            best = best.max(rate(4 * gradient.len(), each * workers as usize, elapsed));
        }
        Ok(best)
    }
}

/// Measurements of every figure; the best counts.
pub const REPEATS: usize = 3;

/// Workers pushing at once in the concurrent pattern.
const CONCURRENT_WORKERS: u32 = 4;

/// The benchmark's shard: asynchronous SGD, no checkpoints, plaintext.
fn shard_config() -> PsConfig {
    PsConfig {
        datacenter: String::new(),
        mirror: None,
        shard: 0,
        shards: 1,
        workers: CONCURRENT_WORKERS as usize,
        consistency: Consistency::Async,
        optimizer: geoml_crds::training_job::Optimizer::Sgd,
        learning_rate: 0.01,
        stopping: StoppingRule::new(
            &geoml_crds::training_job::StoppingRule {
                max_clocks: None,
                target_metric: None,
                min_relative_change: None,
            },
            None,
            true,
        ),
        seed: 0,
        checkpoint: None,
        local_workers: 0..CONCURRENT_WORKERS,
        exit_when_done: false,
        drain_timeout: std::time::Duration::ZERO,
        manifest: None,
        // Measures the transport itself against raw TCP: no TLS on either side.
        transport: Transport::Plaintext,
    }
}

/// Runs the benchmark: a shard of `rows` × `width` floats; dense transfers
/// of every row and sparse ones of every tenth row, `messages` of each.
pub async fn run(rows: usize, width: usize, messages: usize) -> Result<BenchReport, BenchError> {
    let layout = Layout::new(vec![TensorShape {
        name: "w",
        rows,
        cols: width,
    }]);
    let model = Synthetic(layout);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = shard_config();
    let server = tokio::spawn(async move {
        ps::serve(config, &model, listener, &Registry::new(), async {
            let _ = stopped.await;
        })
        .await
    });
    let mut bench = Bench {
        client: RowClient::new(&address, &Transport::Plaintext),
        address,
        width,
        messages,
        clocks: vec![0; CONCURRENT_WORKERS as usize],
        params: vec![0.0; rows * width],
    };

    let dense = vec![0.001_f32; rows * width];
    let sparse_keys: Vec<u32> = (0..u32::try_from(rows)?).step_by(10).collect();
    let sparse = vec![0.001_f32; sparse_keys.len() * width];
    let dense_bytes = 4 * dense.len();
    let sparse_bytes = 4 * (sparse.len() + sparse_keys.len());

    // One unmeasured round trip: the connection is dialled at the first call.
    bench.pull(Some(&sparse_keys)).await?;
    let (n, dense_2) = (messages, 2 * dense_bytes);
    // Arguments run in order: raw TCP first, then the pattern.
    let mut results = vec![
        Throughput::new(
            "push+apply, dense (all rows)",
            dense_bytes,
            n,
            raw_tcp(&[push(dense_bytes)], n).await?,
            bench.pushes(None, &dense).await?,
        ),
        Throughput::new(
            "push+apply, sparse (every 10th row)",
            sparse_bytes,
            n,
            raw_tcp(&[push(sparse_bytes)], n).await?,
            bench.pushes(Some(&sparse_keys), &sparse).await?,
        ),
        Throughput::new(
            "pull, dense (all rows)",
            dense_bytes,
            n,
            raw_tcp(&[pull(dense_bytes)], n).await?,
            bench.pulls(None).await?,
        ),
        Throughput::new(
            "pull, sparse (every 10th row)",
            sparse_bytes,
            n,
            raw_tcp(&[pull(sparse_bytes)], n).await?,
            bench.pulls(Some(&sparse_keys)).await?,
        ),
        Throughput::new(
            "push+pull per clock, dense",
            dense_2,
            n,
            raw_tcp(&[pull(dense_bytes), push(dense_bytes)], n).await?,
            bench.clocks(&dense).await?,
        ),
    ];
    let each = messages / CONCURRENT_WORKERS as usize;
    results.push(Throughput::new(
        "push+apply, dense, 4 workers in flight",
        dense_bytes,
        each * CONCURRENT_WORKERS as usize,
        raw_tcp(&[push(dense_bytes)], n).await?,
        bench.concurrent_pushes(CONCURRENT_WORKERS, &dense).await?,
    ));
    let _ = stop.send(());
    server.await??;
    Ok(BenchReport { results })
}
