//! Biased matrix factorization of a ratings matrix, with sparse working sets.
//!
//! A rating is predicted as `mu + b_u + b_i + p_u · q_i`, with `mu` the mean
//! training rating (a constant, not a parameter). Every user's factors and
//! bias share one row of tensor `p` (`num_users` rows of width `rank + 1`,
//! the bias last), every item's one row of tensor `q` (`num_items` rows of
//! the same width): user `u` is key `u`, item `i` is key `num_users + i`. A
//! mini-batch reads and writes only the rows of its users and items.

use rand_distr::{Distribution, Normal};

use super::{
    Layout, Model, ModelError, TensorShape, Update, WorkingSet, narrow, row_rng, to_f32, to_f64,
};
use crate::data::{Examples, Ratings};

/// Standard deviation of the initial factors (biases start at zero).
pub const INIT_STD: f32 = 0.1;

/// Lowest rating; predictions are clipped to it when evaluating.
pub const MIN_RATING: f32 = 1.0;

/// Highest rating; predictions are clipped to it when evaluating.
pub const MAX_RATING: f32 = 5.0;

/// Biased matrix factorization with squared-error loss.
///
/// The loss of a batch of `n` ratings is the mean over its ratings of
/// `½ (prediction - rating)² + (l2/2) (||p_u||² + ||q_i||²)` (the rows
/// include the biases), and [`Model::gradient`] returns its exact gradient on
/// the batch's rows. The penalty comes with every rating, as in classic
/// per-rating SGD for matrix factorization, so a row is shrunk in proportion
/// to how often it is used and `l2` means the same at any batch size.
#[derive(Clone, Debug)]
pub struct MatrixFactorization {
    layout: Layout,
    num_users: usize,
    num_items: usize,
    rank: usize,
    mean: f32,
    l2: f32,
}

impl MatrixFactorization {
    /// A model of `num_users × num_items` ratings with factors of rank
    /// `rank` around the mean rating `mean`.
    pub fn new(
        num_users: usize,
        num_items: usize,
        rank: usize,
        mean: f32,
        l2: f64,
    ) -> Result<Self, ModelError> {
        let invalid = |field, reason: String| Err(ModelError::Invalid { field, reason });
        if num_users == 0 || num_items == 0 {
            return invalid("kind", "the ratings name no users or no items".to_owned());
        }
        if rank == 0 {
            return invalid("rank", "must be at least 1".to_owned());
        }
        if u32::try_from(num_users + num_items).is_err() {
            return invalid("kind", "users and items do not fit 32-bit keys".to_owned());
        }
        if !(l2.is_finite() && l2 >= 0.0) {
            return invalid(
                "l2",
                format!("must be a finite number at least 0, got {l2}"),
            );
        }
        if !mean.is_finite() {
            return invalid("kind", format!("the mean training rating is {mean}"));
        }
        let layout = Layout::new(vec![
            TensorShape {
                name: "p",
                rows: num_users,
                cols: rank + 1,
            },
            TensorShape {
                name: "q",
                rows: num_items,
                cols: rank + 1,
            },
        ]);
        Ok(Self {
            layout,
            num_users,
            num_items,
            rank,
            mean,
            l2: narrow(l2),
        })
    }

    /// Rank of the factors.
    #[must_use]
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The mean training rating every prediction starts from.
    #[must_use]
    pub fn mean(&self) -> f32 {
        self.mean
    }

    /// Key of user `user`'s row, or `None` for an unknown user.
    #[must_use]
    pub fn user_key(&self, user: u32) -> Option<u32> {
        ((user as usize) < self.num_users).then_some(user)
    }

    /// Key of item `item`'s row, or `None` for an unknown item.
    #[must_use]
    pub fn item_key(&self, item: u32) -> Option<u32> {
        if (item as usize) < self.num_items {
            u32::try_from(self.num_users + item as usize).ok()
        } else {
            None
        }
    }

    /// The loss (see [`MatrixFactorization`]) of `params` on `batch`,
    /// accumulated in `f64`; `None` when they do not fit the model.
    #[must_use]
    pub fn loss(&self, params: &[f32], batch: &Examples) -> Option<f64> {
        let data = self.ratings(batch)?;
        let mut total = 0.0;
        let mut n = 0;
        let squares = |row: &[f32]| {
            row.iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
        };
        for (u, i, r) in self.known(data) {
            let (p, q) = (self.row(params, u)?, self.row(params, i)?);
            let e = f64::from(self.predict(p, q)) - f64::from(r);
            total += 0.5 * e * e + 0.5 * f64::from(self.l2) * (squares(p) + squares(q));
            n += 1;
        }
        if n == 0 {
            return Some(0.0);
        }
        Some(total / to_f64(n))
    }

    /// The batch as ratings, or `None`.
    #[allow(clippy::unused_self)] // a method keeps call sites uniform
    fn ratings<'a>(&self, batch: &'a Examples) -> Option<&'a Ratings> {
        match batch {
            Examples::Ratings(r) => Some(r),
            Examples::Classification(_) => {
                tracing::warn!("matrix factorization was given classification examples");
                None
            }
        }
    }

    /// (user key, item key, rating) of every rating of a known user and item.
    fn known<'a>(&'a self, data: &'a Ratings) -> impl Iterator<Item = (u32, u32, f32)> + 'a {
        data.users
            .iter()
            .zip(&data.items)
            .zip(&data.ratings)
            .filter_map(|((&u, &i), &r)| Some((self.user_key(u)?, self.item_key(i)?, r)))
    }

    /// Row `key` of `params`.
    fn row<'a>(&self, params: &'a [f32], key: u32) -> Option<&'a [f32]> {
        params.get(self.layout.row(key)?)
    }

    /// `mu + b_u + b_i + p_u · q_i` for a user's row `p` and an item's row `q`.
    fn predict(&self, p: &[f32], q: &[f32]) -> f32 {
        let r = self.rank;
        let dot: f32 = p[..r].iter().zip(&q[..r]).map(|(a, b)| a * b).sum();
        self.mean + p[r] + q[r] + dot
    }
}

impl Model for MatrixFactorization {
    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn init_row(&self, key: u32, seed: u64, out: &mut [f32]) {
        out.fill(0.0);
        let Ok(normal) = Normal::new(0.0, INIT_STD) else {
            return;
        };
        let mut rng = row_rng(seed, key);
        for x in out.iter_mut().take(self.rank) {
            *x = normal.sample(&mut rng);
        }
    }

    fn working_set(&self, batch: &Examples) -> WorkingSet {
        let Some(data) = self.ratings(batch) else {
            return WorkingSet::Rows(Vec::new());
        };
        let mut keys: Vec<u32> = self.known(data).flat_map(|(u, i, _)| [u, i]).collect();
        keys.sort_unstable();
        keys.dedup();
        WorkingSet::Rows(keys)
    }

    #[allow(clippy::many_single_char_names)] // u, i, p, q, r as in the MF literature
    fn gradient(&self, params: &[f32], batch: &Examples) -> Update {
        let WorkingSet::Rows(keys) = self.working_set(batch) else {
            return Update {
                keys: Some(Vec::new()),
                values: Vec::new(),
            };
        };
        let width = self.rank + 1;
        let mut values = vec![0.0; keys.len() * width];
        let Some(data) = self.ratings(batch) else {
            return Update {
                keys: Some(keys),
                values,
            };
        };
        if params.len() < self.layout.len() {
            tracing::error!(
                expected = self.layout.len(),
                got = params.len(),
                "parameter vector is shorter than the model's layout"
            );
            return Update {
                keys: Some(keys),
                values,
            };
        }
        let n = self.known(data).count();
        if n == 0 {
            return Update {
                keys: Some(keys),
                values,
            };
        }
        let scale = 1.0 / to_f32(n);
        let r = self.rank;
        for (u, i, rating) in self.known(data) {
            let (Some(p), Some(q)) = (self.row(params, u), self.row(params, i)) else {
                continue;
            };
            let (Ok(pu), Ok(qi)) = (keys.binary_search(&u), keys.binary_search(&i)) else {
                continue;
            };
            let e = (self.predict(p, q) - rating) * scale;
            let shrink = self.l2 * scale;
            let gp = &mut values[pu * width..(pu + 1) * width];
            for (g, (&x, &own)) in gp.iter_mut().zip(q[..r].iter().chain([&1.0]).zip(p)) {
                *g += e * x + shrink * own;
            }
            let gq = &mut values[qi * width..(qi + 1) * width];
            for (g, (&x, &own)) in gq.iter_mut().zip(p[..r].iter().chain([&1.0]).zip(q)) {
                *g += e * x + shrink * own;
            }
        }
        Update {
            keys: Some(keys),
            values,
        }
    }

    fn metric_name(&self) -> &'static str {
        "rmse"
    }

    fn higher_is_better(&self) -> bool {
        false
    }

    /// Root mean squared error of the predictions, each clipped to between
    /// [`MIN_RATING`] and [`MAX_RATING`]; NaN when `test` is empty or not
    /// ratings. A user or item the model does not know contributes only what
    /// is known (the mean and the other side's bias).
    fn evaluate(&self, params: &[f32], test: &Examples) -> f64 {
        let Some(data) = self.ratings(test) else {
            return f64::NAN;
        };
        let n = data
            .ratings
            .len()
            .min(data.users.len())
            .min(data.items.len());
        if n == 0 {
            return f64::NAN;
        }
        let mut total = 0.0;
        for ((&u, &i), &rating) in data.users.iter().zip(&data.items).zip(&data.ratings) {
            let p = self.user_key(u).and_then(|k| self.row(params, k));
            let q = self.item_key(i).and_then(|k| self.row(params, k));
            let prediction = match (p, q) {
                (Some(p), Some(q)) => self.predict(p, q),
                (Some(row), None) | (None, Some(row)) => self.mean + row[self.rank],
                (None, None) => self.mean,
            };
            let e = f64::from(prediction.clamp(MIN_RATING, MAX_RATING)) - f64::from(rating);
            total += e * e;
        }
        (total / to_f64(n)).sqrt()
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the values compared are exact
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random_ratings(n: usize, users: usize, items: usize, seed: u64) -> Examples {
        let mut rng = StdRng::seed_from_u64(seed);
        let users_of = (0..n)
            .map(|_| rng.random_range(0..u32::try_from(users).unwrap()))
            .collect();
        let items_of = (0..n)
            .map(|_| rng.random_range(0..u32::try_from(items).unwrap()))
            .collect();
        let ratings = (0..n)
            .map(|_| f32::from(rng.random_range(1_u8..=5)))
            .collect();
        Examples::Ratings(Ratings {
            users: users_of,
            items: items_of,
            ratings,
            num_users: users,
            num_items: items,
        })
    }

    fn random_params(model: &MatrixFactorization, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..model.layout().len())
            .map(|_| rng.random_range(-0.5..0.5))
            .collect()
    }

    #[test]
    fn layout_and_keys() {
        let model = MatrixFactorization::new(943, 1682, 16, 3.5, 0.0).unwrap();
        let shapes: Vec<_> = model
            .layout()
            .tensors()
            .iter()
            .map(|t| (t.name, t.rows, t.cols))
            .collect();
        assert_eq!(shapes, [("p", 943, 17), ("q", 1682, 17)]);
        assert_eq!(model.user_key(942), Some(942));
        assert_eq!(model.user_key(943), None);
        assert_eq!(model.item_key(0), Some(943));
        assert_eq!(model.item_key(1682), None);
        assert_eq!(model.layout().first_key("q"), Some(943));
    }

    #[test]
    fn gradient_covers_exactly_the_working_set() {
        let model = MatrixFactorization::new(30, 40, 4, 3.0, 0.01).unwrap();
        let batch = random_ratings(20, 30, 40, 1);
        let WorkingSet::Rows(keys) = model.working_set(&batch) else {
            panic!("matrix factorization has sparse working sets");
        };
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        let Examples::Ratings(r) = &batch else {
            unreachable!()
        };
        let mut expected: Vec<u32> = r
            .users
            .iter()
            .copied()
            .chain(r.items.iter().map(|&i| i + 30))
            .collect();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(keys, expected);
        let update = model.gradient(&random_params(&model, 2), &batch);
        assert_eq!(update.keys.as_ref(), Some(&keys));
        let widths: usize = keys
            .iter()
            .map(|&k| model.layout().row(k).unwrap().len())
            .sum();
        assert_eq!(update.values.len(), widths);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let model = MatrixFactorization::new(4, 5, 3, 3.2, 0.1).unwrap();
        let batch = random_ratings(12, 4, 5, 3);
        let params = random_params(&model, 4);
        let update = model.gradient(&params, &batch);
        let keys = update.keys.clone().unwrap();
        let eps = 1e-2_f32;
        let numeric = |j: usize| {
            let mut plus = params.clone();
            plus[j] += eps;
            let mut minus = params.clone();
            minus[j] -= eps;
            (model.loss(&plus, &batch).unwrap() - model.loss(&minus, &batch).unwrap())
                / (2.0 * f64::from(eps))
        };
        let mut values = update.values.iter();
        for key in 0..u32::try_from(model.layout().num_rows()).unwrap() {
            let in_set = keys.contains(&key);
            for j in model.layout().row(key).unwrap() {
                let analytic = if in_set {
                    f64::from(*values.next().unwrap())
                } else {
                    0.0
                };
                let numeric = numeric(j);
                assert!(
                    (numeric - analytic).abs() < 1e-3 + 1e-2 * numeric.abs(),
                    "key {key}, float {j}: numeric {numeric}, analytic {analytic}"
                );
            }
        }
        assert!(values.next().is_none());
    }

    #[test]
    fn init_is_small_deterministic_and_bias_free() {
        let model = MatrixFactorization::new(10, 10, 8, 3.0, 0.0).unwrap();
        let row = |key, seed| {
            let mut out = vec![1.0; 9];
            model.init_row(key, seed, &mut out);
            out
        };
        assert_eq!(row(3, 1), row(3, 1));
        assert_ne!(row(3, 1), row(3, 2));
        assert_ne!(row(3, 1), row(4, 1));
        assert_eq!(row(3, 1)[8], 0.0);
        assert!(row(3, 1).iter().all(|x| x.abs() < 1.0));
    }

    #[test]
    fn evaluate_clips_predictions() {
        let model = MatrixFactorization::new(2, 2, 1, 3.0, 0.0).unwrap();
        // User 0's bias +5 (prediction 8, clipped to 5), user 1's -5 (clipped to 1).
        let params = vec![0.0, 5.0, 0.0, -5.0, 0.0, 0.0, 0.0, 0.0];
        let test = Examples::Ratings(Ratings {
            users: vec![0, 1, 1],
            items: vec![0, 1, 7],
            ratings: vec![5.0, 1.0, 3.0],
            num_users: 2,
            num_items: 2,
        });
        // The unknown item 7 leaves user 1's bias only: 3 - 5 clipped to 1, error 2.
        let expected = (4.0_f64 / 3.0).sqrt();
        assert!((model.evaluate(&params, &test) - expected).abs() < 1e-9);
        assert!(
            model
                .evaluate(&params, &random_ratings(0, 2, 2, 0))
                .is_nan()
        );
        assert_eq!(model.metric_name(), "rmse");
        assert!(!model.higher_is_better());
    }

    #[test]
    fn unknown_users_and_items_are_skipped() {
        let model = MatrixFactorization::new(3, 3, 2, 3.0, 0.0).unwrap();
        let batch = Examples::Ratings(Ratings {
            users: vec![0, 9],
            items: vec![1, 1],
            ratings: vec![4.0, 2.0],
            num_users: 10,
            num_items: 3,
        });
        assert_eq!(model.working_set(&batch), WorkingSet::Rows(vec![0, 4]));
        let update = model.gradient(&vec![0.0; model.layout().len()], &batch);
        assert_eq!(update.values.len(), 6);
        // Only the known rating (error 3 - 4 = -1) contributes, to the biases.
        assert_eq!(update.values, [0.0, 0.0, -1.0, 0.0, 0.0, -1.0]);
    }
}
