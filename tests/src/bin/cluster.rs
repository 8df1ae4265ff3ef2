//! Starts throwaway one-node Kubernetes clusters, one per datacenter, with
//! geoml's images loaded and its operator running as a pod in the first.
//!
//! ```text
//! cargo run -p geoml-tests --bin cluster -- --kubeconfig /tmp/geoml.kubeconfig --datacenters 3
//! kubectl --kubeconfig /tmp/geoml.kubeconfig apply -f manifests/examples/fashion-mnist-lan.yaml
//! ```
//!
//! Kubeconfigs go to PATH, PATH-2, PATH-3, ...; the first cluster holds a
//! kubeconfig Secret `<name>-kubeconfig` in `geoml-system` for each other
//! one, and every cluster a `geoml-data` claim filled from the host's data
//! cache. Ctrl-C or SIGTERM stops every process, deletes the network
//! namespaces, cgroups and data, and removes the kubeconfigs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use geoml_crds::training_job::DatasetName;
use geoml_tests::cluster::OPERATOR_NAMESPACE;
use geoml_tests::{Cluster, geoml_images};
use tokio::signal::unix::{SignalKind, signal};

/// Names of the clusters, in order (the first is the hub).
const NAMES: [&str; 5] = ["us-east", "eu-west", "ap-southeast", "sa-east", "af-south"];

/// Start N one-node clusters with the geoml operator and write their kubeconfigs.
#[derive(Parser)]
#[command(about)]
struct Args {
    /// Where to write the first cluster's admin kubeconfig; the others' go
    /// to PATH-2, PATH-3, ...
    #[arg(long)]
    kubeconfig: PathBuf,
    /// How many clusters (datacenters) to start.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    datacenters: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut sigterm = signal(SignalKind::terminate())?;
    eprintln!("fetching Fashion-MNIST into the data cache (first run only)");
    let data = geoml_dataplane::data::default_cache_dir();
    geoml_dataplane::data::load(DatasetName::FashionMnist, &data)?;
    eprintln!("building the images (the first run builds Kubernetes too; several minutes)");
    let images = geoml_images()?;
    let mut clusters = Vec::new();
    for name in &NAMES[..usize::from(args.datacenters)] {
        eprintln!("starting cluster {name}");
        clusters.push(Cluster::start(name, &images).await?);
    }
    let hub = &clusters[0];
    hub.install_operator().await?;
    let mut written = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        cluster.provide_data("default", &data).await?;
        if i > 0 {
            cluster.publish_kubeconfig(hub).await?;
        }
        let path = if i == 0 {
            args.kubeconfig.clone()
        } else {
            PathBuf::from(format!("{}-{}", args.kubeconfig.display(), i + 1))
        };
        std::fs::copy(cluster.kubeconfig(), &path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "cluster {} (node {} at {}): kubeconfig {}, logs in {} and {}",
            cluster.name(),
            cluster.node().name(),
            cluster.address(),
            path.display(),
            cluster.control_plane().dir().display(),
            cluster.node().dir().display()
        );
        if i > 0 {
            eprintln!(
                "  a Datacenter reaches it with cluster.remote.kubeconfigSecretRef \
                 {{name: {}-kubeconfig, namespace: {OPERATOR_NAMESPACE}}} and peerAccess.serviceType NodePort",
                cluster.name()
            );
        }
        written.push(path);
    }
    eprintln!(
        "ready; the operator runs in {OPERATOR_NAMESPACE} of {}. Ctrl-C or SIGTERM stops everything.",
        hub.name()
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = sigterm.recv() => {}
    }
    drop(clusters);
    for path in written {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    eprintln!("stopped");
    Ok(())
}
