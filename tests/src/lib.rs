//! Test harness: real Kubernetes control planes (etcd + kube-apiserver) for
//! integration tests and local development.
//!
//! The binaries are built from the Go module proxy by `tests/tools/build.sh`
//! and cached; nothing here mocks the apiserver.

mod control_plane;
mod pki;
mod tools;

pub use control_plane::ControlPlane;
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
}

impl Error {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
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
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
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
