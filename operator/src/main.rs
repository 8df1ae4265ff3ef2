//! `geoml-operator`: the operator binary and its subcommands.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use geoml_operator::leader::LeaderElection;
use geoml_operator::{Metrics, Operator, Settings};
use tokio::signal::unix::{SignalKind, signal};

/// The geoml Kubernetes operator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the Datacenter, SyncPolicy and TrainingJob CRDs as YAML.
    Crd,
    /// Run the controllers (with the cluster credentials of the pod, or of
    /// $KUBECONFIG / ~/.kube/config outside a cluster).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Image of the pods of jobs that do not name one.
    #[arg(long, default_value = concat!("ghcr.io/geoml/geoml:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The operator's own namespace: where its leader-election Lease is, and
    /// the only namespace whose Secrets (remote Datacenters' kubeconfigs) it
    /// reads.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "geoml-system",
        alias = "lease-namespace"
    )]
    namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "geoml-operator")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long)]
    identity: Option<String>,
    /// Seconds a leader may go without renewing its Lease.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds between probes of an active Datacenter's cluster.
    #[arg(long, default_value_t = 30)]
    probe_seconds: u64,
    /// Longest wait, in seconds, between retries of failing reconciliations.
    #[arg(long, default_value_t = 300)]
    max_backoff_seconds: u64,
    /// Seconds between reads of a running job's progress.
    #[arg(long, default_value_t = 30)]
    progress_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            std::io::stdout().write_all(geoml_crds::crds_yaml()?.as_bytes())?;
        }
        Command::Run(args) => run(args).await?,
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the cluster")?;
    let settings = Settings {
        default_image: args.image,
        namespace: args.namespace.clone(),
        probe_interval: Duration::from_secs(args.probe_seconds),
        max_backoff: Duration::from_secs(args.max_backoff_seconds),
        progress_interval: Duration::from_secs(args.progress_seconds),
    };
    let operator = Operator::new(client.clone(), settings)?;
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tokio::spawn(serve(listener, operator.metrics(), ready.clone()));

    // One stop signal for SIGTERM/SIGINT and for a lost Lease.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if let Err(error) = wait_for_signal().await {
            tracing::error!(%error, "waiting for signals");
        }
        let _ = on_signal.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let identity = args
        .identity
        .unwrap_or_else(|| format!("geoml-operator-{}", std::process::id()));
    client
        .apiserver_version()
        .await
        .context("reaching the apiserver")?;
    let election = Arc::new(LeaderElection::new(
        client,
        &args.namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_seconds),
    ));
    ready.store(true, Ordering::Relaxed);
    tokio::select! {
        acquired = election.acquire() => acquired?,
        () = until_stopped(stopped.clone()) => return Ok(()),
    }
    let lost = Arc::new(AtomicBool::new(false));
    let keeper = {
        let (election, lost, stop) = (election.clone(), lost.clone(), stop.clone());
        tokio::spawn(async move {
            election.keep().await;
            lost.store(true, Ordering::Relaxed);
            let _ = stop.send(true);
        })
    };
    operator.run(until_stopped(stopped)).await;
    keeper.abort();
    election.release().await;
    anyhow::ensure!(!lost.load(Ordering::Relaxed), "lost the leader Lease");
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

/// Serves `/metrics`, `/healthz` (the process is alive) and `/readyz` (it
/// reached the apiserver and competes for or holds the Lease).
async fn serve(listener: tokio::net::TcpListener, metrics: Metrics, ready: Arc<AtomicBool>) {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    metrics
                        .render()
                        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "serving metrics");
    }
}
