//! Test harness: real Kubernetes control planes (etcd + kube-apiserver) and
//! real one-node clusters (plus controller-manager, scheduler, containerd,
//! kubelet, kube-proxy, each cluster in its own network namespace) for
//! integration tests and local development.
//!
//! The binaries are built from the Go module proxy by `tests/tools/build.sh`
//! and cached; the container runtime is Debian's (`tests/tools/deps.sh`);
//! nothing here mocks the apiserver or the node.

pub mod cert_manager;
mod cgroup;
pub mod cluster;
mod control_plane;
pub mod helm;
pub mod image;
mod network;
mod node;
mod pki;
pub mod prometheus;
pub mod schemas;
pub mod storage;
mod tools;

pub use cert_manager::CertManager;
pub use cluster::{Cluster, geoml_images};
pub use control_plane::ControlPlane;
pub use helm::Helm;
pub use node::Node;
pub use tools::k8s_bin_dir;

/// What can go wrong while starting or using a control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building or finding the Kubernetes binaries failed.
    #[error("kubernetes binaries: {0}")]
    Tools(String),
    /// Generating certificates or keys failed.
    #[error("generating certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A component did not become ready in time; carries the tail of its log.
    #[error("{component} did not become ready within {seconds} s; last log lines:\n{log}")]
    NotReady {
        /// `etcd` or `kube-apiserver`.
        component: &'static str,
        /// How long we waited.
        seconds: u64,
        /// The tail of the component's log.
        log: String,
    },
    /// Building a client from the admin kubeconfig failed.
    #[error("kube client: {0}")]
    Client(String),
    /// A command (ip, nsenter, ctr, cargo, objcopy, ldd) failed.
    #[error("{0}")]
    Command(String),
    /// Building an image failed.
    #[error("building an image: {0}")]
    Image(String),
    /// An HTTP request failed or was not answered with 200.
    #[error("{0}")]
    Http(String),
}

impl Error {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Runs `cmd` with `stdin` (if any) on its standard input and returns its
/// standard output, or its error output as the error.
pub fn run(cmd: &mut std::process::Command, stdin: Option<&str>) -> Result<String, Error> {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io(format!("running {cmd:?}")))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .map_err(Error::io(format!("writing to {cmd:?}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(Error::io(format!("waiting for {cmd:?}")))?;
    if !out.status.success() {
        return Err(Error::Command(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The text of `manifests/examples/<name>`.
pub fn example(name: &str) -> Result<String, Error> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples")
        .join(name);
    std::fs::read_to_string(&path).map_err(Error::io(format!("reading {}", path.display())))
}

/// The data cache, with data set `name` in it (fetched once): the volume
/// the test clusters' data claims are bound to.
pub fn data_cache(
    name: geoml_crds::training_job::DatasetName,
) -> Result<std::path::PathBuf, Error> {
    let dir = geoml_dataplane::data::default_cache_dir();
    geoml_dataplane::data::load(name, &dir)
        .map_err(|e| Error::Command(format!("loading {name:?}: {e}")))?;
    Ok(dir)
}

/// How long [`eventually`] keeps polling.
pub const EVENTUALLY: std::time::Duration = std::time::Duration::from_secs(60);

/// Polls `check` every 200 ms until it returns `Some`.
///
/// # Panics
///
/// After [`EVENTUALLY`], naming `what` (this is for tests).
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    check: impl FnMut() -> F,
) -> T {
    eventually_within(EVENTUALLY, what, check).await
}

/// [`eventually`] with another limit, for what takes minutes (training).
///
/// # Panics
///
/// After `limit`, naming `what`.
pub async fn eventually_within<T, F: std::future::Future<Output = Option<T>>>(
    limit: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
