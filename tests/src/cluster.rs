//! A one-node Kubernetes cluster in its own network namespace: the control
//! plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) and
//! a real node (containerd, kubelet, kube-proxy), with geoml's images loaded.
//! Several run at once; pods of one reach the others' NodePorts through the
//! router (see [`crate::network`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::helm::{self, Helm};
use crate::image::{self, Image};
use crate::network::{Network, NodeNetwork};
use crate::node::Node;
use crate::{ControlPlane, Error, k8s_bin_dir, run, storage};
use geoml_crds::training_job::DEFAULT_DATA_CLAIM;

/// Namespace the operator runs in, and where kubeconfig Secrets live.
pub const OPERATOR_NAMESPACE: &str = "geoml-system";

/// A running cluster; dropping it stops the provisioner, the node, then the
/// control plane, then deletes the node's network namespace.
pub struct Cluster {
    name: String,
    provisioner: tokio::task::JoinHandle<()>,
    node: Node,
    plane: ControlPlane,
    net: NodeNetwork,
    _network: Arc<Network>,
}

impl Cluster {
    /// Starts a cluster called `name` (its node is `<name>-node`) with
    /// `images` loaded, and installs the geoml CRDs.
    pub async fn start(name: &str, images: &[Image]) -> Result<Self, Error> {
        let network = Network::shared()?;
        let net = network.add_node()?;
        let plane = ControlPlane::start_on(name, Some(&net)).await?;
        plane.install_crds().await?;
        let node = Node::start(&format!("{name}-node"), &net, &plane, images).await?;
        let provisioner =
            storage::start_provisioner(plane.client(), node.dir().join("volumes")).await?;
        Ok(Self {
            name: name.to_owned(),
            provisioner,
            node,
            plane,
            net,
            _network: network,
        })
    }

    /// The cluster's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A cluster-admin client.
    #[must_use]
    pub fn client(&self) -> kube::Client {
        self.plane.client()
    }

    /// An admin kubeconfig, valid from the host and from pods of any cluster.
    #[must_use]
    pub fn kubeconfig(&self) -> &Path {
        self.plane.kubeconfig()
    }

    /// The real `kubectl`, pointed at this cluster.
    #[must_use]
    pub fn kubectl(&self) -> Command {
        self.plane.kubectl()
    }

    /// The control plane (its logs and audit log are in its `dir()`).
    #[must_use]
    pub fn control_plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// The node (its component logs are in its `dir()`).
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node's address.
    #[must_use]
    pub fn address(&self) -> std::net::Ipv4Addr {
        self.net.address()
    }

    /// Creates claim `geoml-data` (a TrainingJob's default
    /// `spec.dataset.claimName`) in `namespace`, bound read-only to `dir`,
    /// a data cache in the layout `geoml data fetch` writes.
    pub async fn provide_data(&self, namespace: &str, dir: &Path) -> Result<(), Error> {
        storage::provide_data(&self.client(), namespace, DEFAULT_DATA_CLAIM, dir).await
    }

    /// Loads another image into the node.
    pub fn load(&self, image: &Image) -> Result<(), Error> {
        self.node.load(image)
    }

    /// Stores this cluster's admin kubeconfig in Secret `<name>-kubeconfig`
    /// (key `kubeconfig`) of namespace [`OPERATOR_NAMESPACE`] in `hub`, as a
    /// remote Datacenter's `kubeconfigSecretRef` names it.
    pub async fn publish_kubeconfig(&self, hub: &Self) -> Result<String, Error> {
        let name = format!("{}-kubeconfig", self.name);
        let text = std::fs::read_to_string(self.kubeconfig())
            .map_err(Error::io("reading a kubeconfig"))?;
        hub.apply(
            &Api::<Secret>::namespaced(hub.client(), OPERATOR_NAMESPACE),
            &name,
            &json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": OPERATOR_NAMESPACE},
                    "stringData": {"kubeconfig": text}}),
        )
        .await?;
        Ok(name)
    }

    /// Runs the operator in this cluster from the chart: namespace
    /// [`OPERATOR_NAMESPACE`] and the objects `helm template` renders (its
    /// ServiceAccount, RBAC and Deployment, with the harness's images and
    /// shorter probe and progress intervals), applied with `kubectl`. (The
    /// `helm install` path itself is tested in `tests/tests/helm.rs`.)
    pub async fn install_operator(&self) -> Result<(), Error> {
        self.apply(
            &Api::<Namespace>::all(self.client()),
            OPERATOR_NAMESPACE,
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}),
        )
        .await?;
        let mut values = helm::harness_image_values();
        values.extend([
            "operator.probeSeconds=10".to_owned(),
            "operator.progressSeconds=5".to_owned(),
        ]);
        let manifests = Helm::new()?.template(OPERATOR_NAMESPACE, &values)?;
        let mut apply = self.kubectl();
        apply.args(["apply", "--server-side", "-f", "-"]);
        run(&mut apply, Some(&manifests))?;
        Ok(())
    }

    async fn apply<K>(
        &self,
        api: &Api<K>,
        name: &str,
        object: &serde_json::Value,
    ) -> Result<(), Error>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        api.patch(
            name,
            &PatchParams::apply("geoml-tests").force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|e| Error::Client(format!("applying {name}: {e}")))
        .map(drop)
    }
}

impl Cluster {
    /// Prints what a failed test needs to see: every pod with its restarts,
    /// the TrainingJobs' status and the end of every pod's log.
    fn report(&self) {
        let show = |args: &[&str]| {
            let mut kubectl = self.kubectl();
            kubectl.arg("--request-timeout=10s").args(args);
            match run(&mut kubectl, None) {
                Ok(out) => eprintln!("--- {}: kubectl {}\n{out}", self.name, args.join(" ")),
                Err(e) => eprintln!("--- {}: kubectl {}: {e}", self.name, args.join(" ")),
            }
        };
        show(&["get", "pods", "-A", "-o", "wide"]);
        show(&["get", "trainingjobs", "-A", "-o", "yaml"]);
        let mut list = self.kubectl();
        list.args([
            "--request-timeout=10s",
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace} {.metadata.name}{\"\\n\"}{end}",
        ]);
        for pod in run(&mut list, None).unwrap_or_default().lines() {
            if let Some((namespace, name)) = pod.split_once(' ') {
                show(&[
                    "logs",
                    "-n",
                    namespace,
                    name,
                    "--all-containers",
                    "--tail=40",
                ]);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.report();
        }
        self.provisioner.abort();
    }
}

/// The images geoml's pods run, built from this workspace's binaries (the
/// same dev build the tests use, built here if missing) and the pause image,
/// written under `<target>/images`; once per process, so that tests running
/// side by side never rewrite an archive another one is importing.
pub fn geoml_images() -> Result<Vec<Image>, Error> {
    static IMAGES: std::sync::OnceLock<Result<Vec<Image>, String>> = std::sync::OnceLock::new();
    IMAGES
        .get_or_init(|| build_images().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::Image)
}

fn build_images() -> Result<Vec<Image>, Error> {
    // The binaries `make test`'s `cargo test --workspace --locked` builds:
    // the same command resolves the same features, so under `make test` this
    // builds nothing. (`cargo build -p geoml-runtime -p geoml-operator`
    // resolves fewer features and rebuilt most dependencies: 5 minutes of
    // a cold run.)
    // Without the variables `cargo test` sets for this test binary: ring's
    // build script tracks CARGO_MANIFEST_DIR, and a value the outer build
    // did not see rebuilt every crate above ring (7 minutes of a cold run).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["test", "--workspace", "--locked", "--no-run"]);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
            ]
            .contains(&name.as_ref())
        {
            build.env_remove(name.as_ref());
        }
    }
    run(&mut build, None)?;
    let profile_dir = profile_dir()?;
    let dir = profile_dir.join("images");
    std::fs::create_dir_all(&dir).map_err(Error::io("creating the image directory"))?;
    Ok(vec![
        image::build_binary_image(&profile_dir.join("geoml"), &dir)?,
        image::build_binary_image(&profile_dir.join("geoml-operator"), &dir)?,
        image::build_pause_image(&k8s_bin_dir()?.join("pause"), &dir)?,
    ])
}

/// `target/<profile>`: the directory of the running executable, or its parent
/// when that is `deps` (a test binary).
fn profile_dir() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().map_err(Error::io("locating the test binary"))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| Error::Image("the test binary has no directory".into()))?
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}
