//! `geoml`: the data-plane binary — parameter servers, workers, and local runs.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use geoml_runtime::manifest::Manifest;
use geoml_runtime::metrics::{self, WorkerMetrics};
use geoml_runtime::ps::shard::Consistency;
use geoml_runtime::ps::stopping::StoppingRule;
use geoml_runtime::ps::{self, PsConfig};
use geoml_runtime::run::{RunOptions, run};
use geoml_runtime::worker::{self, WorkerConfig};
use geoml_runtime::{data, model};
use prometheus::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Geo-distributed machine learning: parameter servers, workers, local runs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a TrainingJob manifest on this machine with real processes on loopback.
    Run(RunArgs),
    /// Serve one parameter-server shard.
    Ps(PsArgs),
    /// Train as one worker.
    Worker(WorkerArgs),
    /// Measure push+apply throughput of a parameter server against raw
    /// loopback TCP in the same run (build with --release).
    Bench {
        /// Rows of the benchmark model.
        #[arg(long, default_value_t = 4096)]
        rows: usize,
        /// Floats per row.
        #[arg(long, default_value_t = 64)]
        width: usize,
        /// Messages per measurement.
        #[arg(long, default_value_t = 300)]
        messages: usize,
    },
    /// Serve Cartel's metadata registry (Collaborative jobs).
    Registry(geoml_runtime::cartel::cli::RegistryArgs),
    /// Run one site of a Collaborative job (Cartel or isolated).
    Site(geoml_runtime::cartel::cli::SiteArgs),
    /// Run Collaborative jobs in every mode (cartel, isolated, centralized,
    /// global) and print the figures with Cartel's ratios (build with --release).
    CartelBench(geoml_runtime::cartel::cli::BenchArgs),
    /// Fetch data sets into the cache (FashionMNIST, MovieLens100K, Nycflights13, Digits).
    Data {
        /// Data set names as in a TrainingJob's spec.dataset.name.
        names: Vec<String>,
        #[command(flatten)]
        common: DataArgs,
    },
}

#[derive(Args, Clone)]
struct DataArgs {
    /// Where data sets are cached [default: $GEOML_CACHE_DIR/data or ~/.cache/geoml/data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl DataArgs {
    fn dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(data::default_cache_dir)
    }
}

#[derive(Args)]
struct RunArgs {
    /// A manifest holding the TrainingJob, its SyncPolicy and Datacenters.
    manifest: PathBuf,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where logs and checkpoints go [default: a new temporary directory].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Evaluate on held-out data every this many clocks.
    #[arg(long, default_value_t = 20)]
    eval_every: u64,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct RoleArgs {
    /// The manifest holding the TrainingJob.
    #[arg(long)]
    manifest: PathBuf,
    /// Seed of the initial model and the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct PsArgs {
    /// Index of this shard.
    #[arg(long)]
    shard: u32,
    /// Number of shards.
    #[arg(long)]
    shards: u32,
    /// Number of workers.
    #[arg(long)]
    workers: usize,
    /// Address to serve gRPC on.
    #[arg(long)]
    listen: SocketAddr,
    /// Keep checkpoints and the write-ahead log here, and restore from them.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[command(flatten)]
    role: RoleArgs,
}

#[derive(Args)]
struct WorkerArgs {
    /// Index of this worker.
    #[arg(long)]
    index: u32,
    /// Number of workers.
    #[arg(long)]
    workers: usize,
    /// Parameter-server addresses in shard order, comma-separated (http://host:port).
    #[arg(long, value_delimiter = ',')]
    ps: Vec<String>,
    /// Evaluate every this many clocks (worker 0).
    #[arg(long, default_value_t = 20)]
    eval_every: u64,
    #[command(flatten)]
    role: RoleArgs,
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn serve_metrics(addr: Option<SocketAddr>, registry: &Registry) {
    if let Some(addr) = addr {
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, registry, shutdown_signal()).await {
                tracing::error!(%addr, "metrics endpoint: {e}");
            }
        });
    }
}

async fn serve_ps(args: PsArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&args.role.manifest)?;
    let job = manifest.job()?;
    let spec = &job.job.spec;
    let data = data::load(spec.dataset.name, &args.role.data.dir())?;
    let model = model::build(&spec.model, &data)?;
    let interval = spec.checkpoint.as_ref().map_or(10, |c| c.interval_clocks);
    #[allow(clippy::cast_possible_truncation)] // learning rates are small
    let config = PsConfig {
        shard: args.shard,
        shards: args.shards,
        workers: args.workers,
        consistency: Consistency::from_policy(&job.sync_policy.spec.intra_datacenter),
        optimizer: spec.model.optimizer,
        learning_rate: spec.model.learning_rate as f32,
        stopping: StoppingRule::new(&spec.stopping, model.higher_is_better()),
        seed: args.role.seed,
        checkpoint: args
            .checkpoint_dir
            .map(|dir| (dir, u64::try_from(interval).unwrap_or(10))),
    };
    let registry = Registry::new();
    serve_metrics(args.role.metrics_listen, &registry);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    ps::serve(
        config,
        model.as_ref(),
        listener,
        &registry,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&args.role.manifest)?;
    let job = manifest.job()?;
    let spec = &job.job.spec;
    let data = data::load(spec.dataset.name, &args.role.data.dir())?;
    let model = model::build(&spec.model, &data)?;
    let parts = data::partition(
        &data.train,
        args.workers,
        &spec.dataset.partitioning,
        args.role.seed,
    );
    let partition = parts
        .into_iter()
        .nth(args.index as usize)
        .with_context(|| {
            format!(
                "--index {} is not below --workers {}",
                args.index, args.workers
            )
        })?;
    let registry = Registry::new();
    let metrics = WorkerMetrics::new(&registry, args.index)?;
    serve_metrics(args.role.metrics_listen, &registry);
    let config = WorkerConfig {
        index: args.index,
        parameter_servers: args.ps,
        batch_size: usize::try_from(spec.model.batch_size).unwrap_or(64),
        seed: args.role.seed,
        eval_every: args.eval_every,
        retry_for: std::time::Duration::from_secs(120),
    };
    tokio::select! {
        summary = worker::run(&config, model.as_ref(), &data, partition, &metrics) => {
            let summary = summary?;
            tracing::info!(clock = summary.clock, metric = ?summary.metric, "finished");
        }
        () = shutdown_signal() => tracing::info!("interrupted"),
    }
    Ok(())
}

async fn run_job(args: RunArgs) -> anyhow::Result<()> {
    // Without --work-dir, logs and checkpoints go to a directory removed at the end.
    let temp = tempfile::Builder::new().prefix("geoml-run-").tempdir()?;
    let work_dir = args.work_dir.unwrap_or_else(|| temp.path().to_owned());
    let options = RunOptions {
        geoml: std::env::current_exe()?,
        manifest: args.manifest,
        work_dir,
        data_dir: args.data.dir(),
        eval_every: args.eval_every,
        progress: true,
    };
    let report = run(options).await?;
    print!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn fetch(names: &[String], args: &DataArgs) -> anyhow::Result<()> {
    for name in names {
        let name: geoml_crds::training_job::DatasetName =
            serde_json::from_value(serde_json::Value::String(name.clone()))
                .with_context(|| format!("unknown data set {name:?}"))?;
        data::load(name, &args.dir())?;
        println!("{name:?}: ready in {}", args.dir().display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run_job(args).await,
        Command::Ps(args) => serve_ps(args).await,
        Command::Worker(args) => run_worker(args).await,
        Command::Data { names, common } => fetch(&names, &common),
        Command::Registry(args) => {
            Ok(geoml_runtime::cartel::cli::registry(args, shutdown_signal()).await?)
        }
        Command::Site(args) => Ok(geoml_runtime::cartel::cli::site(args, shutdown_signal()).await?),
        Command::CartelBench(args) => {
            print!("{}", geoml_runtime::cartel::cli::bench(args).await?);
            Ok(())
        }
        Command::Bench {
            rows,
            width,
            messages,
        } => {
            let report = geoml_runtime::bench::run(rows, width, messages)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            print!("{}", report.table());
            Ok(())
        }
    }
}
