//! Dense feed-forward classifiers: softmax regression and the multi-layer perceptron.
//!
//! Both are a stack of fully connected layers, ReLU between them and a
//! softmax with cross-entropy loss on top; softmax regression is the stack
//! without hidden layers. Layer `l` owns a weight tensor (`inputs` rows of
//! width `outputs`: row `f` holds input `f`'s weight to every output) and a
//! bias tensor (one row of width `outputs`). Every mini-batch reads and
//! writes every row, so the working set is always [`WorkingSet::All`].

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis};
use rand_distr::{Distribution, Normal};

use super::{
    Layout, Model, ModelError, TensorShape, Update, WorkingSet, narrow, row_rng, to_f32, to_f64,
};
use crate::data::{Classification, Examples};

/// Tensor names of softmax regression.
const SOFTMAX_NAMES: [(&str, &str); 1] = [("w", "b")];

/// Tensor names of the MLP's layers: `w1`, `b1`, `w2`, `b2`, ...
const MLP_NAMES: [(&str, &str); super::MAX_HIDDEN_LAYERS + 1] = [
    ("w1", "b1"),
    ("w2", "b2"),
    ("w3", "b3"),
    ("w4", "b4"),
    ("w5", "b5"),
    ("w6", "b6"),
    ("w7", "b7"),
    ("w8", "b8"),
    ("w9", "b9"),
];

/// Examples per forward pass when evaluating, to bound memory on big test sets.
const EVAL_CHUNK: usize = 1000;

/// How weights start out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    /// All zeros (softmax regression is convex; zeros are a fine start).
    Zeros,
    /// He-normal before a ReLU, Glorot-normal before the softmax.
    Scaled,
}

/// Where one layer's tensors live in the flat parameters.
#[derive(Clone, Debug)]
struct Dims {
    inputs: usize,
    outputs: usize,
    /// Offset (in floats) of the weights, `inputs × outputs`.
    w: usize,
    /// Offset (in floats) of the biases, `outputs`.
    b: usize,
    /// First key of the weights; the bias row's key is `w_key + inputs`.
    w_key: usize,
}

/// A dense feed-forward classifier with cross-entropy loss.
///
/// The loss of a batch of `n` examples is
/// `-(1/n) Σ log softmax(x)[label] + (l2/2) Σ ||W||²` (weights only, no
/// biases), and [`Model::gradient`] returns its exact gradient.
#[derive(Clone, Debug)]
pub struct Dense {
    layout: Layout,
    layers: Vec<Dims>,
    l2: f32,
    init: Init,
}

impl Dense {
    /// Multinomial logistic regression on `features` inputs: tensor `w`
    /// (`features × classes`) and `b` (`1 × classes`), initialised to zero.
    pub fn softmax_regression(
        features: usize,
        classes: usize,
        l2: f64,
    ) -> Result<Self, ModelError> {
        Self::new(&[features, classes], &SOFTMAX_NAMES, l2, Init::Zeros)
    }

    /// A multi-layer perceptron with ReLU hidden layers of widths `hidden`:
    /// tensors `w1`, `b1`, `w2`, `b2`, ...; weights He/Glorot-initialised.
    pub fn mlp(
        features: usize,
        hidden: &[usize],
        classes: usize,
        l2: f64,
    ) -> Result<Self, ModelError> {
        if hidden.is_empty() || hidden.len() > super::MAX_HIDDEN_LAYERS {
            return Err(ModelError::Invalid {
                field: "hiddenUnits",
                reason: format!(
                    "between 1 and {} hidden layers, got {}",
                    super::MAX_HIDDEN_LAYERS,
                    hidden.len()
                ),
            });
        }
        let mut sizes = vec![features];
        sizes.extend_from_slice(hidden);
        sizes.push(classes);
        Self::new(&sizes, &MLP_NAMES, l2, Init::Scaled)
    }

    fn new(
        sizes: &[usize],
        names: &[(&'static str, &'static str)],
        l2: f64,
        init: Init,
    ) -> Result<Self, ModelError> {
        let invalid = |field, reason: String| Err(ModelError::Invalid { field, reason });
        if sizes.first().is_none_or(|&d| d == 0) {
            return invalid("kind", "the data set has no features".to_owned());
        }
        if sizes.last().is_none_or(|&c| c < 2) {
            return invalid("kind", "a classifier needs at least 2 classes".to_owned());
        }
        if sizes.contains(&0) {
            return invalid("hiddenUnits", "every width must be at least 1".to_owned());
        }
        if !(l2.is_finite() && l2 >= 0.0) {
            return invalid(
                "l2",
                format!("must be a finite number at least 0, got {l2}"),
            );
        }
        let mut tensors = Vec::new();
        let mut layers = Vec::new();
        let (mut at, mut key) = (0, 0);
        for (pair, &(w_name, b_name)) in sizes.windows(2).zip(names) {
            let (inputs, outputs) = (pair[0], pair[1]);
            tensors.push(TensorShape {
                name: w_name,
                rows: inputs,
                cols: outputs,
            });
            tensors.push(TensorShape {
                name: b_name,
                rows: 1,
                cols: outputs,
            });
            layers.push(Dims {
                inputs,
                outputs,
                w: at,
                b: at + inputs * outputs,
                w_key: key,
            });
            at += (inputs + 1) * outputs;
            key += inputs + 1;
        }
        if layers.len() + 1 != sizes.len() {
            return invalid("hiddenUnits", format!("at most {} layers", names.len()));
        }
        if u32::try_from(key).is_err() {
            return invalid("kind", format!("{key} rows do not fit 32-bit keys"));
        }
        Ok(Self {
            layout: Layout::new(tensors),
            layers,
            l2: narrow(l2),
            init,
        })
    }

    /// Number of input features.
    #[must_use]
    pub fn features(&self) -> usize {
        self.layers.first().map_or(0, |l| l.inputs)
    }

    /// Number of classes.
    #[must_use]
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.outputs)
    }

    /// The loss (see [`Dense`]) of `params` on `batch`, accumulated in
    /// `f64`; `None` when `params` or `batch` do not fit the model.
    #[must_use]
    pub fn loss(&self, params: &[f32], batch: &Examples) -> Option<f64> {
        let data = self.classification(batch)?;
        let weights = self.weights(params)?;
        let n = data.labels.len();
        if n == 0 {
            return Some(0.0);
        }
        let activations = self.forward(&weights, data.features.view());
        let logits = activations.last()?;
        let mut total = 0.0;
        for (row, &label) in logits.outer_iter().zip(&data.labels) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&z| f64::from(z - max).exp()).sum();
            let target = row
                .get(usize::from(label))
                .map_or(f64::NEG_INFINITY, |&z| f64::from(z - max));
            total += sum.ln() - target;
        }
        let penalty: f64 = weights
            .iter()
            .flat_map(|(w, _)| w.iter())
            .map(|&x| f64::from(x) * f64::from(x))
            .sum();
        Some(total / to_f64(n) + 0.5 * f64::from(self.l2) * penalty)
    }

    /// The batch as classification examples of the model's width, or `None`.
    fn classification<'a>(&self, batch: &'a Examples) -> Option<&'a Classification> {
        match batch {
            Examples::Classification(c)
                if c.features.ncols() == self.features()
                    && c.features.nrows() == c.labels.len() =>
            {
                Some(c)
            }
            Examples::Classification(c) => {
                tracing::warn!(
                    expected = self.features(),
                    got = c.features.ncols(),
                    rows = c.features.nrows(),
                    labels = c.labels.len(),
                    "examples do not fit the model (features) or themselves (labels)"
                );
                None
            }
            Examples::Ratings(_) => {
                tracing::warn!("a classifier was given ratings");
                None
            }
        }
    }

    /// Views of every layer's weights and biases in `params`, or `None` when
    /// `params` is shorter than the layout.
    fn weights<'a>(&self, params: &'a [f32]) -> Option<Vec<(ArrayView2<'a, f32>, &'a [f32])>> {
        if params.len() < self.layout.len() {
            tracing::error!(
                expected = self.layout.len(),
                got = params.len(),
                "parameter vector is shorter than the model's layout"
            );
            return None;
        }
        self.layers
            .iter()
            .map(|l| {
                let w = params.get(l.w..l.b)?;
                let b = params.get(l.b..l.b + l.outputs)?;
                Some((ArrayView2::from_shape((l.inputs, l.outputs), w).ok()?, b))
            })
            .collect()
    }

    /// Every layer's output for `x`: the hidden layers' after ReLU, then the
    /// logits (before softmax).
    #[allow(clippy::unused_self, clippy::needless_pass_by_value)] // views are cheap; a method keeps call sites uniform
    fn forward(
        &self,
        weights: &[(ArrayView2<'_, f32>, &[f32])],
        x: ArrayView2<'_, f32>,
    ) -> Vec<Array2<f32>> {
        let mut outputs: Vec<Array2<f32>> = Vec::with_capacity(weights.len());
        for (l, (w, b)) in weights.iter().enumerate() {
            let mut z = Array2::from_shape_fn((x.nrows(), w.ncols()), |(_, j)| b[j]);
            match outputs.last() {
                Some(a) => general_mat_mul(1.0, a, w, 1.0, &mut z),
                None => general_mat_mul(1.0, &x, w, 1.0, &mut z),
            }
            if l + 1 < weights.len() {
                z.mapv_inplace(|v| v.max(0.0));
            }
            outputs.push(z);
        }
        outputs
    }

    /// The index of the largest logit of every row.
    #[allow(clippy::needless_pass_by_value)] // views are cheap to pass
    fn predict(
        &self,
        weights: &[(ArrayView2<'_, f32>, &[f32])],
        x: ArrayView2<'_, f32>,
    ) -> Vec<usize> {
        let Some(logits) = self.forward(weights, x).pop() else {
            return Vec::new();
        };
        logits
            .outer_iter()
            .map(|row| {
                let mut best = 0;
                for (j, &z) in row.iter().enumerate() {
                    if z > row[best] {
                        best = j;
                    }
                }
                best
            })
            .collect()
    }

    fn zero_update(&self) -> Update {
        Update {
            keys: None,
            values: vec![0.0; self.layout.len()],
        }
    }
}

/// Replaces every row of `logits` by its softmax.
fn softmax_rows(logits: &mut Array2<f32>) {
    for mut row in logits.outer_iter_mut() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.mapv_inplace(|z| (z - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|p| p / sum);
    }
}

impl Model for Dense {
    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn init_row(&self, key: u32, seed: u64, out: &mut [f32]) {
        out.fill(0.0);
        if self.init == Init::Zeros {
            return;
        }
        let k = key as usize;
        let last = self.layers.len().saturating_sub(1);
        let Some((index, layer)) = self
            .layers
            .iter()
            .enumerate()
            .find(|(_, l)| (l.w_key..l.w_key + l.inputs).contains(&k))
        else {
            return; // a bias row, or an unknown key: zeros
        };
        let (fan_in, fan_out) = (to_f64(layer.inputs), to_f64(layer.outputs));
        let std = if index == last {
            (2.0 / (fan_in + fan_out)).sqrt()
        } else {
            (2.0 / fan_in).sqrt()
        };
        let Ok(normal) = Normal::new(0.0, narrow(std)) else {
            return;
        };
        let mut rng = row_rng(seed, key);
        for x in out {
            *x = normal.sample(&mut rng);
        }
    }

    fn working_set(&self, _batch: &Examples) -> WorkingSet {
        WorkingSet::All
    }

    fn gradient(&self, params: &[f32], batch: &Examples) -> Update {
        let (Some(data), Some(weights)) = (self.classification(batch), self.weights(params)) else {
            return self.zero_update();
        };
        let n = data.labels.len();
        if n == 0 {
            return self.zero_update();
        }
        // Starts as a copy of the parameters: the weight slots then become
        // `l2·W + inputᵀ·delta` in one product, the bias slots are overwritten.
        let mut values = params[..self.layout.len()].to_vec();
        let x = data.features.view();
        let mut activations = self.forward(&weights, x);
        let Some(mut delta) = activations.pop() else {
            return self.zero_update();
        };
        // d loss / d logits = (softmax - one_hot(label)) / n.
        softmax_rows(&mut delta);
        let scale = 1.0 / to_f32(n);
        for (mut row, &label) in delta.outer_iter_mut().zip(&data.labels) {
            if let Some(p) = row.get_mut(usize::from(label)) {
                *p -= 1.0;
            }
            row *= scale;
        }
        for (l, (layer, (w, _))) in self.layers.iter().zip(&weights).enumerate().rev() {
            let input = if l == 0 { x } else { activations[l - 1].view() };
            // dW = inputᵀ·delta + l2·W, written straight into the update.
            if let Some(Ok(mut dw)) = values
                .get_mut(layer.w..layer.b)
                .map(|slot| ArrayViewMut2::from_shape((layer.inputs, layer.outputs), slot))
            {
                general_mat_mul(1.0, &input.t(), &delta, self.l2, &mut dw);
            }
            if let Some(slot) = values.get_mut(layer.b..layer.b + layer.outputs) {
                for (g, s) in slot.iter_mut().zip(delta.sum_axis(Axis(0))) {
                    *g = s;
                }
            }
            if l > 0 {
                // Back through the weights, then through the ReLU.
                let mut back = delta.dot(&w.t());
                back.zip_mut_with(&activations[l - 1], |g, &a| {
                    if a <= 0.0 {
                        *g = 0.0;
                    }
                });
                delta = back;
            }
        }
        Update { keys: None, values }
    }

    fn metric_name(&self) -> &'static str {
        "accuracy"
    }

    fn higher_is_better(&self) -> bool {
        true
    }

    /// Fraction of `test` classified correctly; NaN when `test` is empty or
    /// does not fit the model.
    fn evaluate(&self, params: &[f32], test: &Examples) -> f64 {
        let (Some(data), Some(weights)) = (self.classification(test), self.weights(params)) else {
            return f64::NAN;
        };
        let n = data.labels.len();
        if n == 0 {
            return f64::NAN;
        }
        let mut correct = 0;
        for (start, chunk) in (0..n)
            .step_by(EVAL_CHUNK)
            .zip(data.features.axis_chunks_iter(Axis(0), EVAL_CHUNK))
        {
            let labels = &data.labels[start..(start + EVAL_CHUNK).min(n)];
            correct += self
                .predict(&weights, chunk)
                .iter()
                .zip(labels)
                .filter(|&(&p, &y)| p == usize::from(y))
                .count();
        }
        to_f64(correct) / to_f64(n)
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp, clippy::cast_precision_loss)] // exact values; statistics of small vectors
mod tests {
    use ndarray::Array2;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random_examples(n: usize, features: usize, classes: usize, seed: u64) -> Examples {
        let mut rng = StdRng::seed_from_u64(seed);
        let features = Array2::from_shape_fn((n, features), |_| rng.random::<f32>());
        let labels = (0..n)
            .map(|_| rng.random_range(0..u16::try_from(classes).unwrap()))
            .collect();
        Examples::Classification(Classification {
            features,
            labels,
            classes,
        })
    }

    fn random_params(model: &Dense, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..model.layout().len())
            .map(|_| rng.random_range(-0.5..0.5))
            .collect()
    }

    /// Central differences of the loss against the analytic gradient, for
    /// every parameter.
    fn check_gradient(model: &Dense, params: &[f32], batch: &Examples) {
        let update = model.gradient(params, batch);
        assert_eq!(update.keys, None);
        assert_eq!(update.values.len(), model.layout().len());
        let eps = 1e-3_f32;
        let mut worst = 0.0_f64;
        for (j, &analytic) in update.values.iter().enumerate() {
            let mut plus = params.to_vec();
            plus[j] += eps;
            let mut minus = params.to_vec();
            minus[j] -= eps;
            let numeric = (model.loss(&plus, batch).unwrap() - model.loss(&minus, batch).unwrap())
                / (2.0 * f64::from(eps));
            let error = (numeric - f64::from(analytic)).abs() / (1e-2 + numeric.abs());
            worst = worst.max(error);
            assert!(
                error < 2e-2,
                "parameter {j}: numeric {numeric}, analytic {analytic}"
            );
        }
        assert!(worst < 2e-2);
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        let model = Dense::softmax_regression(6, 4, 0.1).unwrap();
        let batch = random_examples(9, 6, 4, 1);
        check_gradient(&model, &random_params(&model, 2), &batch);
    }

    #[test]
    fn mlp_gradient_matches_finite_differences() {
        for (hidden, l2) in [(vec![5], 0.0), (vec![7, 4], 0.05), (vec![3, 3, 3], 0.0)] {
            let model = Dense::mlp(5, &hidden, 3, l2).unwrap();
            let batch = random_examples(11, 5, 3, 3);
            // Larger weights than the init so that every layer matters.
            let params: Vec<f32> = random_params(&model, 4).iter().map(|x| 2.0 * x).collect();
            check_gradient(&model, &params, &batch);
        }
    }

    #[test]
    fn layout_names_and_shapes() {
        let softmax = Dense::softmax_regression(64, 10, 0.0).unwrap();
        let shapes: Vec<_> = softmax
            .layout()
            .tensors()
            .iter()
            .map(|t| (t.name, t.rows, t.cols))
            .collect();
        assert_eq!(shapes, [("w", 64, 10), ("b", 1, 10)]);
        assert_eq!(softmax.layout().num_rows(), 65);
        assert_eq!(softmax.layout().len(), 650);
        assert_eq!(softmax.layout().first_key("b"), Some(64));

        let mlp = Dense::mlp(784, &[128, 32], 10, 0.0).unwrap();
        let shapes: Vec<_> = mlp
            .layout()
            .tensors()
            .iter()
            .map(|t| (t.name, t.rows, t.cols))
            .collect();
        assert_eq!(
            shapes,
            [
                ("w1", 784, 128),
                ("b1", 1, 128),
                ("w2", 128, 32),
                ("b2", 1, 32),
                ("w3", 32, 10),
                ("b3", 1, 10)
            ]
        );
        assert_eq!(mlp.layout().len(), 785 * 128 + 129 * 32 + 33 * 10);
        assert_eq!(mlp.layout().first_key("w2"), Some(785));
        assert_eq!(mlp.layout().row(785), Some(785 * 128..785 * 128 + 32));
    }

    #[test]
    fn rejects_too_many_or_empty_layers() {
        assert!(Dense::mlp(4, &[2; 8], 3, 0.0).is_ok());
        assert!(matches!(
            Dense::mlp(4, &[2; 9], 3, 0.0),
            Err(ModelError::Invalid {
                field: "hiddenUnits",
                ..
            })
        ));
        assert!(matches!(
            Dense::mlp(4, &[], 3, 0.0),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            Dense::mlp(4, &[3, 0], 3, 0.0),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            Dense::softmax_regression(0, 3, 0.0),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            Dense::softmax_regression(4, 1, 0.0),
            Err(ModelError::Invalid { .. })
        ));
        assert!(matches!(
            Dense::softmax_regression(4, 3, -1.0),
            Err(ModelError::Invalid { field: "l2", .. })
        ));
    }

    #[test]
    fn working_set_is_every_row() {
        let model = Dense::mlp(5, &[4], 3, 0.0).unwrap();
        assert_eq!(
            model.working_set(&random_examples(4, 5, 3, 0)),
            WorkingSet::All
        );
    }

    fn init(model: &Dense, seed: u64) -> Vec<f32> {
        let mut params = vec![0.0; model.layout().len()];
        for key in 0..u32::try_from(model.layout().num_rows()).unwrap() {
            let range = model.layout().row(key).unwrap();
            model.init_row(key, seed, &mut params[range]);
        }
        params
    }

    #[test]
    fn init_is_deterministic_in_seed_and_scaled() {
        let model = Dense::mlp(200, &[100], 10, 0.0).unwrap();
        let a = init(&model, 7);
        assert_eq!(a, init(&model, 7));
        assert_ne!(a, init(&model, 8));
        // A row does not depend on which rows were initialised before it.
        let mut row = vec![0.0; 100];
        model.init_row(3, 7, &mut row);
        assert_eq!(row, a[300..400]);
        // He for the hidden layer, Glorot for the output; biases zero.
        let std = |xs: &[f32]| {
            (xs.iter().map(|x| f64::from(x * x)).sum::<f64>() / xs.len() as f64).sqrt()
        };
        let w1 = &a[..200 * 100];
        assert!(
            (std(w1) - (2.0_f64 / 200.0).sqrt()).abs() < 0.01,
            "{}",
            std(w1)
        );
        let b1 = &a[200 * 100..201 * 100];
        assert!(b1.iter().all(|&x| x == 0.0));
        let w2 = &a[201 * 100..201 * 100 + 1000];
        assert!(
            (std(w2) - (2.0_f64 / 110.0).sqrt()).abs() < 0.02,
            "{}",
            std(w2)
        );
        // Softmax regression starts at zero.
        let softmax = Dense::softmax_regression(5, 3, 0.0).unwrap();
        assert!(init(&softmax, 1).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn evaluate_counts_argmax_hits_across_chunks() {
        // Weights that copy feature j to class j: the argmax of the features.
        let model = Dense::softmax_regression(3, 3, 0.0).unwrap();
        let mut params = vec![0.0; model.layout().len()];
        for j in 0..3 {
            params[j * 3 + j] = 1.0;
        }
        let n = 2500;
        let features = Array2::from_shape_fn((n, 3), |(i, j)| if i % 3 == j { 1.0 } else { 0.0 });
        // Every fifth label is wrong.
        let labels = (0..n)
            .map(|i| u16::try_from(if i % 5 == 0 { (i + 1) % 3 } else { i % 3 }).unwrap())
            .collect();
        let test = Examples::Classification(Classification {
            features,
            labels,
            classes: 3,
        });
        assert!((model.evaluate(&params, &test) - 0.8).abs() < 1e-12);
    }

    #[test]
    fn wrong_inputs_give_zeros_not_panics() {
        let model = Dense::mlp(5, &[4], 3, 0.0).unwrap();
        let params = random_params(&model, 0);
        let narrow = random_examples(4, 4, 3, 0);
        assert!(
            model
                .gradient(&params, &narrow)
                .values
                .iter()
                .all(|&g| g == 0.0)
        );
        assert!(model.evaluate(&params, &narrow).is_nan());
        let batch = random_examples(4, 5, 3, 0);
        assert!(
            model
                .gradient(&params[..10], &batch)
                .values
                .iter()
                .all(|&g| g == 0.0)
        );
        let empty = random_examples(0, 5, 3, 0);
        assert!(model.evaluate(&params, &empty).is_nan());
        assert_eq!(
            model.gradient(&params, &empty).values.len(),
            model.layout().len()
        );
    }

    #[test]
    fn a_gradient_step_lowers_the_loss() {
        let model = Dense::mlp(5, &[8], 3, 0.0).unwrap();
        let batch = random_examples(32, 5, 3, 5);
        let mut params = init(&model, 1);
        let before = model.loss(&params, &batch).unwrap();
        for _ in 0..50 {
            let update = model.gradient(&params, &batch);
            for (p, g) in params.iter_mut().zip(&update.values) {
                *p -= 0.5 * g;
            }
        }
        assert!(model.loss(&params, &batch).unwrap() < before);
    }
}
