//! Container images without Docker or a registry: an OCI image layout,
//! written as one tar archive that `ctr images import` loads into a node.
//!
//! The images hold what the repository's `Dockerfile` puts in them: the
//! binary in `/usr/local/bin`, the C libraries it links (as `ldd` lists them;
//! the Dockerfile takes them from distroless `cc`), a `nonroot` user
//! (65532), and the binary as the entrypoint. Layers are uncompressed and
//! every tar header is fixed (mtime 0, root-owned), so the same binaries give
//! the same image digest.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Error, run};

/// Registry and repository prefix of geoml's images, as the chart and the
/// operator's defaults name them.
pub const REPOSITORY: &str = "ghcr.io/geoml";
/// Tag of geoml's images: the crates' version.
pub const TAG: &str = env!("CARGO_PKG_VERSION");
/// The pause image containerd runs as every pod's sandbox.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// The non-root user geoml's containers run as (distroless's `nonroot`).
pub const NONROOT_UID: u32 = 65_532;

/// An image archive on disk and the name it is imported under.
#[derive(Clone, Debug)]
pub struct Image {
    /// Full reference, e.g. `ghcr.io/geoml/geoml:0.1.0`.
    pub name: String,
    /// The OCI layout tar.
    pub archive: PathBuf,
}

/// `ghcr.io/geoml/<binary>:<version>`.
#[must_use]
pub fn reference(binary: &str) -> String {
    format!("{REPOSITORY}/{binary}:{TAG}")
}

/// Builds the image of `binary` (a dynamically linked Rust executable) into
/// `dir`: the binary, stripped of debug information, its libraries and an
/// `/etc/passwd` with the `nonroot` user.
pub fn build_binary_image(binary: &Path, dir: &Path) -> Result<Image, Error> {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Image(format!("{} has no file name", binary.display())))?;
    let stripped = dir.join(format!("{name}.stripped"));
    run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&stripped),
        None,
    )?;
    let mut layer = Layer::default();
    layer.file(&format!("usr/local/bin/{name}"), &read(&stripped)?, 0o755)?;
    for lib in linked_libraries(binary)? {
        let inside = lib
            .strip_prefix("/")
            .unwrap_or(&lib)
            .to_string_lossy()
            .into_owned();
        let real = std::fs::canonicalize(&lib)
            .map_err(Error::io(format!("resolving {}", lib.display())))?;
        layer.file(&inside, &read(&real)?, 0o755)?;
    }
    layer.file(
        "etc/passwd",
        format!("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT_UID}:{NONROOT_UID}:nonroot:/home/nonroot:/sbin/nologin\n").as_bytes(),
        0o644,
    )?;
    layer.file(
        "etc/group",
        format!("root:x:0:\nnonroot:x:{NONROOT_UID}:\n").as_bytes(),
        0o644,
    )?;
    layer.dir("tmp", 0o1777)?;
    layer.dir("home/nonroot", 0o755)?;
    let reference = reference(name);
    let archive = dir.join(format!("{name}.oci.tar"));
    write_layout(
        &archive,
        &reference,
        layer,
        &json!({
            "Entrypoint": [format!("/usr/local/bin/{name}")],
            "User": format!("{NONROOT_UID}:{NONROOT_UID}"),
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
        }),
    )?;
    Ok(Image {
        name: reference,
        archive,
    })
}

/// Builds the pause image from the static `pause` binary that
/// `tests/tools/build.sh` compiles from the kubernetes module's `pause.c`.
pub fn build_pause_image(pause: &Path, dir: &Path) -> Result<Image, Error> {
    let mut layer = Layer::default();
    layer.file("pause", &read(pause)?, 0o755)?;
    let archive = dir.join("pause.oci.tar");
    write_layout(
        &archive,
        PAUSE_IMAGE,
        layer,
        &json!({"Entrypoint": ["/pause"], "User": "65535:65535"}),
    )?;
    Ok(Image {
        name: PAUSE_IMAGE.to_owned(),
        archive,
    })
}

/// The shared libraries `ldd` says `binary` loads, by the paths it names
/// (which are where the dynamic loader looks for them in the image too).
fn linked_libraries(binary: &Path) -> Result<BTreeSet<PathBuf>, Error> {
    let out = run(Command::new("ldd").arg(binary), None)?;
    let mut libs = BTreeSet::new();
    for line in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// One uncompressed layer, built in memory.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Default for Layer {
    fn default() -> Self {
        Self {
            tar: tar::Builder::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }
}

impl Layer {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header
    }

    fn dir(&mut self, path: &str, mode: u32) -> Result<(), Error> {
        let mut prefix = String::new();
        for part in path.split('/') {
            prefix.push_str(part);
            prefix.push('/');
            if self.dirs.insert(prefix.clone()) {
                let mut header = Self::header(
                    tar::EntryType::Directory,
                    if prefix == format!("{path}/") {
                        mode
                    } else {
                        0o755
                    },
                    0,
                );
                self.tar
                    .append_data(&mut header, &prefix, std::io::empty())
                    .map_err(Error::io(format!("adding {prefix} to a layer")))?;
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &str, bytes: &[u8], mode: u32) -> Result<(), Error> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        let mut header = Self::header(tar::EntryType::Regular, mode, bytes.len() as u64);
        self.tar
            .append_data(&mut header, path, bytes)
            .map_err(Error::io(format!("adding {path} to a layer")))
    }

    fn finish(self) -> Result<Vec<u8>, Error> {
        self.tar
            .into_inner()
            .map_err(Error::io("finishing a layer"))
    }
}

/// Writes an OCI image layout holding one image of one `layer` with the
/// container `config`, named `reference` for `ctr images import`.
fn write_layout(
    archive: &Path,
    reference: &str,
    layer: Layer,
    config: &serde_json::Value,
) -> Result<(), Error> {
    let layer = layer.finish()?;
    let layer_digest = digest(&layer);
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config = serde_json::to_vec(&config).map_err(|e| Error::Image(e.to_string()))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    });
    let manifest = serde_json::to_vec(&manifest).map_err(|e| Error::Image(e.to_string()))?;
    let tag = reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let index = serde_json::to_vec(&index).map_err(|e| Error::Image(e.to_string()))?;

    let mut out = Layer::default();
    out.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?;
    out.file("index.json", &index, 0o644)?;
    for blob in [&layer, &config, &manifest] {
        let name = digest(blob).replace(':', "/");
        out.file(&format!("blobs/{name}"), blob, 0o644)?;
    }
    std::fs::write(archive, out.finish()?)
        .map_err(Error::io(format!("writing {}", archive.display())))
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_reproducible_and_list_parent_directories() {
        let build = || {
            let mut layer = Layer::default();
            layer.file("usr/local/bin/x", b"hello", 0o755).unwrap();
            layer.finish().unwrap()
        };
        let (a, b) = (build(), build());
        assert_eq!(digest(&a), digest(&b));
        let mut archive = tar::Archive::new(a.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            ["usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/x"]
        );
    }
}
