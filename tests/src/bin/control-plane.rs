//! Starts a throwaway Kubernetes control plane for local development.
//!
//! ```text
//! cargo run -p geoml-tests --bin control-plane -- --kubeconfig /tmp/geoml.kubeconfig
//! kubectl --kubeconfig /tmp/geoml.kubeconfig get ns
//! ```
//!
//! Ctrl-C or SIGTERM stops etcd and kube-apiserver, deletes their data and
//! removes the kubeconfig.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use geoml_tests::ControlPlane;
use tokio::signal::unix::{SignalKind, signal};

/// Start etcd + kube-apiserver on loopback and write an admin kubeconfig.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Where to write the admin kubeconfig.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Also install the geoml CRDs.
    #[arg(long)]
    crds: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut sigterm = signal(SignalKind::terminate())?;
    eprintln!("starting etcd and kube-apiserver (the first run builds them; several minutes)");
    let plane = ControlPlane::start("dev").await?;
    if args.crds {
        plane.install_crds().await?;
    }
    std::fs::copy(plane.kubeconfig(), &args.kubeconfig)
        .with_context(|| format!("writing {}", args.kubeconfig.display()))?;
    eprintln!(
        "control plane ready at {}\n  kubeconfig: {}\n  logs and data: {}\nCtrl-C or SIGTERM stops it.",
        plane.server(),
        args.kubeconfig.display(),
        plane.dir().display()
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = sigterm.recv() => {}
    }
    drop(plane);
    std::fs::remove_file(&args.kubeconfig)
        .with_context(|| format!("removing {}", args.kubeconfig.display()))?;
    eprintln!("stopped");
    Ok(())
}
