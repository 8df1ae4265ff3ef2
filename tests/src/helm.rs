//! The real `helm` and `kubeconform`, built from the Go module proxy with the
//! Kubernetes binaries, and the repository's chart they work on.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::{Error, image, k8s_bin_dir, run};

/// Name of the release the harness installs the chart as.
pub const RELEASE: &str = "geoml";

/// The repository's chart, `charts/geoml`.
#[must_use]
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/geoml")
}

/// `helm` with its own empty config, cache and data directories (so no
/// user's repositories or plugins take part), optionally pointed at a
/// cluster.
pub struct Helm {
    bin: PathBuf,
    home: TempDir,
    kubeconfig: Option<PathBuf>,
}

impl Helm {
    /// `helm` from the tools cache, talking to no cluster.
    pub fn new() -> Result<Self, Error> {
        let home = tempfile::Builder::new()
            .prefix("geoml-helm-")
            .tempdir()
            .map_err(Error::io("creating helm's home"))?;
        Ok(Self {
            bin: k8s_bin_dir()?.join("helm"),
            home,
            kubeconfig: None,
        })
    }

    /// The same, pointed at the cluster of `kubeconfig`.
    #[must_use]
    pub fn with_kubeconfig(mut self, kubeconfig: &Path) -> Self {
        self.kubeconfig = Some(kubeconfig.to_owned());
        self
    }

    /// A `helm` command with this home (and kubeconfig); add the arguments.
    #[must_use]
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        let home = self.home.path();
        cmd.env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env_remove("HELM_NAMESPACE")
            .env_remove("HELM_KUBECONTEXT");
        match &self.kubeconfig {
            Some(path) => cmd.env("KUBECONFIG", path),
            None => cmd.env("KUBECONFIG", home.join("no-cluster")),
        };
        cmd
    }

    /// The chart's ServiceAccount and RBAC objects, rendered for a release
    /// in `namespace`: what the operator may do, nothing else installed.
    pub fn rbac(&self, namespace: &str) -> Result<String, Error> {
        let kinds = [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ];
        Ok(self
            .template(namespace, &[])?
            .split("\n---")
            .filter(|doc| {
                kinds
                    .iter()
                    .any(|kind| doc.contains(&format!("\nkind: {kind}\n")))
            })
            .collect::<Vec<_>>()
            .join("\n---"))
    }

    /// `helm template` of the chart as release [`RELEASE`] in `namespace`
    /// with `--set` values; the rendered manifests.
    pub fn template(&self, namespace: &str, values: &[String]) -> Result<String, Error> {
        let mut cmd = self.command();
        cmd.arg("template")
            .arg(RELEASE)
            .arg(chart_dir())
            .args(["--namespace", namespace]);
        for value in values {
            cmd.args(["--set", value]);
        }
        run(&mut cmd, None)
    }
}

/// `--set` values that point the chart at the images the harness builds and
/// loads into its nodes (see [`crate::geoml_images`]).
#[must_use]
pub fn harness_image_values() -> Vec<String> {
    let mut values = Vec::new();
    for (key, binary) in [("image", "geoml-operator"), ("jobImage", "geoml")] {
        let reference = image::reference(binary);
        let (repository, tag) = reference
            .rsplit_once(':')
            .unwrap_or((reference.as_str(), image::TAG));
        values.push(format!("{key}.repository={repository}"));
        values.push(format!("{key}.tag={tag}"));
    }
    values
}

/// The `kubeconform` binary from the tools cache.
pub fn kubeconform_bin() -> Result<PathBuf, Error> {
    Ok(k8s_bin_dir()?.join("kubeconform"))
}
