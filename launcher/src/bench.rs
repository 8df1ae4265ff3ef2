//! `geoml bench`: push+apply throughput of a parameter-server shard, dense
//! and sparse, next to raw loopback TCP measured in the same run.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use geoml_dataplane::data::Examples;
use geoml_dataplane::model::{Layout, Model, TensorShape, Update, WorkingSet};
use geoml_dataplane::ps::shard::Consistency;
use geoml_dataplane::ps::stopping::StoppingRule;
use geoml_dataplane::ps::{self, PsConfig};
use geoml_dataplane::tls::Transport;
use geoml_dataplane::worker::connect;
use geoml_proto as pb;

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
    /// Payload bytes per message.
    pub message_bytes: usize,
    /// Messages sent.
    pub messages: usize,
    /// Payload megabytes per second.
    pub mb_per_second: f64,
}

/// Results of one benchmark run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// Raw TCP, then dense pushes, then sparse pushes.
    pub results: Vec<Throughput>,
}

impl BenchReport {
    /// The results as a table with ratios against raw TCP.
    #[must_use]
    pub fn table(&self) -> String {
        let raw = self.results.first().map_or(1.0, |r| r.mb_per_second);
        let mut out = format!(
            "{:<36} {:>12} {:>10} {:>10}\n",
            "transfer", "message", "MB/s", "vs raw"
        );
        for r in &self.results {
            let _ = writeln!(
                out,
                "{:<36} {:>12} {:>10.1} {:>9.0}%",
                r.name,
                crate::report::human_bytes(r.message_bytes as u64),
                r.mb_per_second,
                100.0 * r.mb_per_second / raw
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

/// Request/response over raw TCP: `bytes` out, one byte back, like a unary RPC.
async fn raw_tcp(bytes: usize, messages: usize) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buffer = vec![0; bytes];
        for _ in 0..messages {
            socket.read_exact(&mut buffer).await?;
            socket.write_all(&[1]).await?;
        }
        std::io::Result::Ok(())
    });
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let payload = vec![7_u8; bytes];
    let mut ack = [0];
    let started = Instant::now();
    for _ in 0..messages {
        socket.write_all(&payload).await?;
        socket.read_exact(&mut ack).await?;
    }
    let elapsed = started.elapsed();
    server.await.map_err(std::io::Error::other)??;
    Ok(rate(bytes, messages, elapsed))
}

/// Runs the benchmark: a shard of `rows` × `width` floats; dense pushes of
/// every row and sparse pushes of every tenth row, `messages` of each.
pub async fn run(
    rows: usize,
    width: usize,
    messages: usize,
) -> Result<BenchReport, Box<dyn std::error::Error>> {
    let layout = Layout::new(vec![TensorShape {
        name: "w",
        rows,
        cols: width,
    }]);
    let model = Synthetic(layout);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = PsConfig {
        datacenter: String::new(),
        mirror: None,
        shard: 0,
        shards: 1,
        workers: 1,
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
        local_workers: 0..1,
        exit_when_done: false,
        drain_timeout: std::time::Duration::ZERO,
        manifest: None,
        // Measures gRPC itself against raw TCP: no TLS on either side.
        transport: Transport::Plaintext,
    };
    let server = tokio::spawn(async move {
        ps::serve(config, &model, listener, &Registry::new(), async {
            let _ = stopped.await;
        })
        .await
    });
    let mut client = connect(&[address], &Transport::Plaintext)?.remove(0);

    let dense_values = geoml_proto::rows::pack_values(&vec![0.001; rows * width]);
    let sparse_keys: Vec<u32> = (0..u32::try_from(rows)?).step_by(10).collect();
    let sparse_values = geoml_proto::rows::pack_values(&vec![0.001; sparse_keys.len() * width]);
    let sparse_key_bytes = geoml_proto::rows::pack_keys(&sparse_keys);

    let mut clock = 0;
    let mut measure = async |keys: Option<&[u8]>, values: &[u8]| -> Result<f64, tonic::Status> {
        let started = Instant::now();
        for _ in 0..messages {
            clock += 1;
            client
                .push(pb::PushRequest {
                    worker: 0,
                    clock,
                    gradient: Some(pb::Rows {
                        keys: keys.map(<[u8]>::to_vec).unwrap_or_default(),
                        values: values.to_vec(),
                        all: keys.is_none(),
                    }),
                })
                .await?;
        }
        let bytes = keys.map_or(0, <[u8]>::len) + values.len();
        Ok(rate(bytes, messages, started.elapsed()))
    };
    let dense = measure(None, &dense_values).await?;
    let sparse = measure(Some(&sparse_key_bytes), &sparse_values).await?;
    let raw = raw_tcp(dense_values.len(), messages).await?;
    let _ = stop.send(());
    server.await??;

    Ok(BenchReport {
        results: vec![
            Throughput {
                name: "raw TCP request/ack".into(),
                message_bytes: dense_values.len(),
                messages,
                mb_per_second: raw,
            },
            Throughput {
                name: "push+apply, dense (all rows)".into(),
                message_bytes: dense_values.len(),
                messages,
                mb_per_second: dense,
            },
            Throughput {
                name: "push+apply, sparse (every 10th row)".into(),
                message_bytes: sparse_values.len() + sparse_key_bytes.len(),
                messages,
                mb_per_second: sparse,
            },
        ],
    })
}
