//! Models behind one small trait: parameters as rows of tensors, gradients
//! over mini-batches, evaluation on held-out data.
//!
//! INTERFACE (fixed; the parameter server and workers build on it).
//!
//! Parameters are a flat `Vec<f32>` split into *rows*: every tensor of the
//! model is `rows × cols`, stored row-major, tensors one after another. A
//! row's global index (its *key*, `u32`) is what parameter servers shard and
//! what sparse pulls and pushes name.

mod dense;
mod mf;

use std::ops::Range;

use geoml_crds::training_job::{ModelKind, ModelSpec};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::data::{DataSet, Examples};

pub use dense::Dense;
pub use mf::MatrixFactorization;

/// Width of the hidden layer of an `MLP` whose spec leaves `hiddenUnits` unset.
pub const DEFAULT_HIDDEN_UNITS: usize = 128;

/// Rank of a `MatrixFactorization` whose spec leaves `rank` unset.
pub const DEFAULT_RANK: usize = 16;

/// Most hidden layers an `MLP` may have (the CRD's limit).
pub const MAX_HIDDEN_LAYERS: usize = 8;

/// Shape of one tensor of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorShape {
    /// Name, for example `w1`.
    pub name: &'static str,
    /// Rows (keys).
    pub rows: usize,
    /// Width of every row.
    pub cols: usize,
}

/// Where every row of every tensor lives in the flat parameter vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    tensors: Vec<TensorShape>,
    /// Start (in floats) of every row, plus the total length at the end.
    row_starts: Vec<usize>,
}

impl Layout {
    /// The layout of `tensors`, one after another.
    #[must_use]
    pub fn new(tensors: Vec<TensorShape>) -> Self {
        let mut row_starts = Vec::new();
        let mut at = 0;
        for t in &tensors {
            for _ in 0..t.rows {
                row_starts.push(at);
                at += t.cols;
            }
        }
        row_starts.push(at);
        Self {
            tensors,
            row_starts,
        }
    }

    /// The tensors.
    #[must_use]
    pub fn tensors(&self) -> &[TensorShape] {
        &self.tensors
    }

    /// Number of rows (keys) over all tensors.
    #[must_use]
    pub fn num_rows(&self) -> usize {
        self.row_starts.len() - 1
    }

    /// Number of floats over all tensors.
    #[must_use]
    pub fn len(&self) -> usize {
        self.row_starts.last().copied().unwrap_or(0)
    }

    /// True for a model without parameters.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Range of row `key` in the flat parameter vector; `None` for an unknown key.
    #[must_use]
    pub fn row(&self, key: u32) -> Option<Range<usize>> {
        let k = key as usize;
        Some(*self.row_starts.get(k)?..*self.row_starts.get(k + 1)?)
    }

    /// First key of the tensor called `name`.
    #[must_use]
    pub fn first_key(&self, name: &str) -> Option<u32> {
        let mut key = 0;
        for t in &self.tensors {
            if t.name == name {
                return u32::try_from(key).ok();
            }
            key += t.rows;
        }
        None
    }
}

/// The rows a mini-batch needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkingSet {
    /// Every row (dense models).
    All,
    /// These keys, sorted and unique (sparse models such as matrix factorization).
    Rows(Vec<u32>),
}

/// A gradient: for every row in `keys` (or every row of the model, in key
/// order, when `keys` is `None`), `width` floats in `values`.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// Sorted, unique keys; `None` means all rows.
    pub keys: Option<Vec<u32>>,
    /// The rows' values, concatenated in key order.
    pub values: Vec<f32>,
}

/// A trainable model.
pub trait Model: Send + Sync {
    /// The model's parameter layout.
    fn layout(&self) -> &Layout;

    /// Initial value of row `key`, deterministic in (`key`, `seed`), written
    /// to `out` (the row's width). Parameter-server shards initialise their
    /// own rows independently with it.
    fn init_row(&self, key: u32, seed: u64, out: &mut [f32]);

    /// The rows `batch` reads and writes.
    fn working_set(&self, batch: &Examples) -> WorkingSet;

    /// Mean gradient of the loss (with L2) over `batch` at `params` (the full
    /// flat vector; only the working set's rows need be current). Sparse
    /// models return only the rows of their working set.
    fn gradient(&self, params: &[f32], batch: &Examples) -> Update;

    /// Name of the evaluation metric: `accuracy` or `rmse`.
    fn metric_name(&self) -> &'static str;

    /// True when a higher metric is better (accuracy), false for RMSE.
    fn higher_is_better(&self) -> bool;

    /// The metric of `params` on `test`.
    fn evaluate(&self, params: &[f32], test: &Examples) -> f64;
}

/// What can go wrong building a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model kind does not fit the data set.
    #[error("spec.model.kind: {kind} cannot be trained on {data} data")]
    Mismatch {
        /// The model kind.
        kind: String,
        /// `classification` or `ratings`.
        data: &'static str,
    },
    /// The model kind is not implemented in this runtime.
    #[error("spec.model.kind: {0} is not supported by the parameter-server runtime")]
    Unsupported(String),
    /// A field of the spec, or the data set's shape, does not describe a
    /// model that can be built (for example a hidden layer of width 0).
    #[error("spec.model.{field}: {reason}")]
    Invalid {
        /// The field, for example `hiddenUnits`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Builds the model `spec` asks for, sized for `data` (number of features,
/// classes, users, items; MF also takes the mean training rating).
pub fn build(spec: &ModelSpec, data: &DataSet) -> Result<Box<dyn Model>, ModelError> {
    let l2 = spec.l2;
    match (spec.kind, &data.train) {
        (ModelKind::SoftmaxRegression, Examples::Classification(train)) => {
            let (features, classes) = classification_shape(train, &data.test);
            Ok(Box::new(Dense::softmax_regression(features, classes, l2)?))
        }
        (ModelKind::Mlp, Examples::Classification(train)) => {
            let (features, classes) = classification_shape(train, &data.test);
            let hidden = match &spec.hidden_units {
                None => vec![DEFAULT_HIDDEN_UNITS],
                Some(units) => units
                    .iter()
                    .map(|&u| {
                        usize::try_from(u).ok().filter(|&u| u > 0).ok_or_else(|| {
                            ModelError::Invalid {
                                field: "hiddenUnits",
                                reason: format!("every width must be at least 1, got {u}"),
                            }
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            Ok(Box::new(Dense::mlp(features, &hidden, classes, l2)?))
        }
        (ModelKind::MatrixFactorization, Examples::Ratings(train)) => {
            let rank = match spec.rank {
                None => DEFAULT_RANK,
                Some(r) => usize::try_from(r).ok().filter(|&r| r > 0).ok_or_else(|| {
                    ModelError::Invalid {
                        field: "rank",
                        reason: format!("must be at least 1, got {r}"),
                    }
                })?,
            };
            let (num_users, num_items) = match &data.test {
                Examples::Ratings(test) => (
                    train.num_users.max(test.num_users),
                    train.num_items.max(test.num_items),
                ),
                Examples::Classification(_) => (train.num_users, train.num_items),
            };
            Ok(Box::new(MatrixFactorization::new(
                num_users,
                num_items,
                rank,
                mean_rating(&train.ratings),
                l2,
            )?))
        }
        (ModelKind::OnlineLinear | ModelKind::OnlineForest, _) => {
            Err(ModelError::Unsupported(kind_name(spec.kind).to_owned()))
        }
        (kind, train) => Err(ModelError::Mismatch {
            kind: kind_name(kind).to_owned(),
            data: data_kind(train),
        }),
    }
}

/// The CRD's spelling of `kind` (`MLP`, not `Mlp`).
#[must_use]
pub fn kind_name(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::SoftmaxRegression => "SoftmaxRegression",
        ModelKind::Mlp => "MLP",
        ModelKind::MatrixFactorization => "MatrixFactorization",
        ModelKind::OnlineLinear => "OnlineLinear",
        ModelKind::OnlineForest => "OnlineForest",
    }
}

/// `classification` or `ratings`.
#[must_use]
pub fn data_kind(examples: &Examples) -> &'static str {
    match examples {
        Examples::Classification(_) => "classification",
        Examples::Ratings(_) => "ratings",
    }
}

/// Features and classes of a classification data set; the class count
/// covers the test set too, should it name a class the training set lacks.
fn classification_shape(train: &crate::data::Classification, test: &Examples) -> (usize, usize) {
    let classes = match test {
        Examples::Classification(test) => train.classes.max(test.classes),
        Examples::Ratings(_) => train.classes,
    };
    (train.features.ncols(), classes)
}

/// Mean of `ratings` (0 for none), accumulated in `f64`.
fn mean_rating(ratings: &[f32]) -> f32 {
    if ratings.is_empty() {
        return 0.0;
    }
    let sum: f64 = ratings.iter().map(|&r| f64::from(r)).sum();
    #[allow(clippy::cast_possible_truncation)] // a mean rating fits an f32
    let mean = (sum / to_f64(ratings.len())) as f32;
    mean
}

/// A random number generator for row `key`, deterministic in (`seed`, `key`)
/// alone, so that any parameter-server shard can initialise any row.
#[must_use]
pub fn row_rng(seed: u64, key: u32) -> StdRng {
    StdRng::seed_from_u64(splitmix64(splitmix64(seed) ^ u64::from(key)))
}

/// The splitmix64 finaliser: a cheap, well-mixed 64-bit hash (the first
/// output of a SplitMix64 generator seeded with `x`).
#[must_use]
pub fn splitmix64(x: u64) -> u64 {
    rand::RngCore::next_u64(&mut rand_xoshiro::SplitMix64::seed_from_u64(x))
}

/// `n` as `f32`; counts of examples stay far below 2^24, where `f32` is exact.
#[allow(clippy::cast_precision_loss)]
fn to_f32(n: usize) -> f32 {
    n as f32
}

/// `n` as `f64`; counts stay far below 2^53, where `f64` is exact.
#[allow(clippy::cast_precision_loss)]
fn to_f64(n: usize) -> f64 {
    n as f64
}

/// `x` (a hyper-parameter such as `l2`) as the `f32` the arithmetic uses.
#[allow(clippy::cast_possible_truncation)]
fn narrow(x: f64) -> f32 {
    x as f32
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::*;
    use crate::data::{Classification, Ratings};

    #[test]
    fn splitmix64_is_the_reference_finaliser() {
        // The first outputs of Vigna's splitmix64.c seeded with 0 and 1.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(1), 0x910a_2dec_8902_5cc1);
    }

    fn spec(kind: ModelKind) -> ModelSpec {
        ModelSpec::new(kind)
    }

    fn images() -> DataSet {
        let examples = |n| {
            Examples::Classification(Classification {
                features: Array2::zeros((n, 12)),
                labels: vec![0; n],
                classes: 4,
            })
        };
        DataSet {
            train: examples(5),
            test: examples(2),
        }
    }

    fn ratings() -> DataSet {
        let examples = |ratings: Vec<f32>| {
            Examples::Ratings(Ratings {
                users: vec![0; ratings.len()],
                items: vec![1; ratings.len()],
                ratings,
                num_users: 3,
                num_items: 7,
            })
        };
        DataSet {
            train: examples(vec![1.0, 2.0, 4.5]),
            test: examples(vec![5.0]),
        }
    }

    fn shapes(model: &dyn Model) -> Vec<(&'static str, usize, usize)> {
        model
            .layout()
            .tensors()
            .iter()
            .map(|t| (t.name, t.rows, t.cols))
            .collect()
    }

    #[test]
    fn builds_each_kind_sized_for_its_data() {
        let softmax = build(&spec(ModelKind::SoftmaxRegression), &images()).unwrap();
        assert_eq!(shapes(softmax.as_ref()), [("w", 12, 4), ("b", 1, 4)]);
        let mlp = build(&spec(ModelKind::Mlp), &images()).unwrap();
        assert_eq!(
            shapes(mlp.as_ref()),
            [
                ("w1", 12, 128),
                ("b1", 1, 128),
                ("w2", 128, 4),
                ("b2", 1, 4)
            ]
        );
        let mut deep = spec(ModelKind::Mlp);
        deep.hidden_units = Some(vec![8, 6]);
        assert_eq!(build(&deep, &images()).unwrap().layout().tensors().len(), 6);
        let mf = build(&spec(ModelKind::MatrixFactorization), &ratings()).unwrap();
        assert_eq!(shapes(mf.as_ref()), [("p", 3, 17), ("q", 7, 17)]);
        // The mean training rating (2.5) is the prediction of all-zero factors.
        let params = vec![0.0; mf.layout().len()];
        assert!((mf.evaluate(&params, &ratings().test) - 2.5).abs() < 1e-6);
    }

    #[test]
    fn refuses_what_it_cannot_build() {
        let err = build(&spec(ModelKind::Mlp), &ratings()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "spec.model.kind: MLP cannot be trained on ratings data"
        );
        let err = build(&spec(ModelKind::OnlineForest), &images())
            .err()
            .unwrap();
        assert!(matches!(err, ModelError::Unsupported(ref k) if k == "OnlineForest"));
        let mut bad = spec(ModelKind::Mlp);
        bad.hidden_units = Some(vec![8, -1]);
        let err = build(&bad, &images()).err().unwrap();
        assert!(
            matches!(
                err,
                ModelError::Invalid {
                    field: "hiddenUnits",
                    ..
                }
            ),
            "{err}"
        );
        bad.hidden_units = Some(vec![4; 9]);
        assert!(build(&bad, &images()).is_err());
        let mut bad = spec(ModelKind::MatrixFactorization);
        bad.rank = Some(0);
        let err = build(&bad, &ratings()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "spec.model.rank: must be at least 1, got 0"
        );
    }

    #[test]
    fn row_seeds_differ_by_key_and_seed() {
        use rand::RngCore;
        let first = |seed, key| row_rng(seed, key).next_u64();
        assert_eq!(first(1, 2), first(1, 2));
        assert_ne!(first(1, 2), first(1, 3));
        assert_ne!(first(1, 2), first(2, 2));
        assert_ne!(first(0, 1), first(1, 0));
    }
}
