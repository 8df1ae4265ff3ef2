//! Locates the Kubernetes binaries, building them on first use.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::Error;

/// The directory holding `kube-apiserver`, `kube-controller-manager`,
/// `kubectl` and `etcd`: `$GEOML_K8S_BIN` if set, otherwise the cache that
/// `tests/tools/build.sh` fills (and builds, the first time).
pub fn k8s_bin_dir() -> Result<PathBuf, Error> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("GEOML_K8S_BIN") {
            return Ok(PathBuf::from(dir));
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/build.sh");
        let out = Command::new("bash")
            .arg(script)
            .output()
            .map_err(|e| format!("running {script}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{script} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .last()
            .map(PathBuf::from)
            .ok_or_else(|| format!("{script} printed no directory"))
    })
    .clone()
    .map_err(Error::Tools)
}
