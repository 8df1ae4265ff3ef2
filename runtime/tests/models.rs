//! Models train to useful accuracy with plain sequential SGD.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)] // test code

use geoml_crds::training_job::{DatasetName, ModelKind, ModelSpec};
use geoml_dataplane::data::{self, DataSet, Examples, Ratings};
use geoml_dataplane::model::{self, Model, Update};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

fn spec(kind: ModelKind) -> ModelSpec {
    ModelSpec::new(kind)
}

/// Every row initialised as a parameter server would, one by one.
fn init(model: &dyn Model, seed: u64) -> Vec<f32> {
    let layout = model.layout();
    let mut params = vec![0.0; layout.len()];
    for key in 0..u32::try_from(layout.num_rows()).unwrap() {
        let range = layout.row(key).unwrap();
        model.init_row(key, seed, &mut params[range]);
    }
    params
}

/// `params -= lr * update`, on the update's rows.
fn apply(model: &dyn Model, params: &mut [f32], update: &Update, lr: f32) {
    match &update.keys {
        None => {
            assert_eq!(update.values.len(), params.len());
            for (p, g) in params.iter_mut().zip(&update.values) {
                *p -= lr * g;
            }
        }
        Some(keys) => {
            let mut values = update.values.iter();
            for &key in keys {
                for p in &mut params[model.layout().row(key).unwrap()] {
                    *p -= lr * values.next().unwrap();
                }
            }
            assert!(values.next().is_none(), "update longer than its rows");
        }
    }
}

/// Plain sequential mini-batch SGD; the test metric after every epoch.
fn sgd(model: &dyn Model, data: &DataSet, epochs: usize, batch: usize, lr: f32) -> Vec<f64> {
    let mut params = init(model, 42);
    let mut rng = StdRng::seed_from_u64(7);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let mut metrics = Vec::new();
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for indices in order.chunks(batch) {
            let examples = data.train.select(indices);
            let update = model.gradient(&params, &examples);
            apply(model, &mut params, &update, lr);
        }
        metrics.push(model.evaluate(&params, &data.test));
    }
    metrics
}

fn digits() -> DataSet {
    let cache = tempfile::tempdir().unwrap();
    data::load(DatasetName::Digits, cache.path()).unwrap()
}

#[test]
fn softmax_regression_learns_digits() {
    let data = digits();
    let model = model::build(&spec(ModelKind::SoftmaxRegression), &data).unwrap();
    assert_eq!(model.metric_name(), "accuracy");
    let accuracy = sgd(model.as_ref(), &data, 5, 32, 0.5);
    println!("softmax regression on Digits, test accuracy per epoch: {accuracy:.3?}");
    assert!(accuracy[accuracy.len() - 1] >= 0.90, "{accuracy:?}");
}

#[test]
fn mlp_learns_digits() {
    let data = digits();
    let model = model::build(&spec(ModelKind::Mlp), &data).unwrap();
    let accuracy = sgd(model.as_ref(), &data, 8, 32, 0.2);
    println!("MLP [128] on Digits, test accuracy per epoch: {accuracy:.3?}");
    assert!(accuracy[accuracy.len() - 1] >= 0.90, "{accuracy:?}");
}

/// Ratings of a rank-2 matrix plus a little noise, 80% for training.
fn low_rank_ratings(users: usize, items: usize, per_user: usize) -> DataSet {
    let mut rng = StdRng::seed_from_u64(1);
    let normal = Normal::new(0.0_f32, 0.8).unwrap();
    let noise = Normal::new(0.0_f32, 0.1).unwrap();
    let factors = |n: usize, rng: &mut StdRng| -> Vec<[f32; 2]> {
        (0..n)
            .map(|_| [normal.sample(rng), normal.sample(rng)])
            .collect()
    };
    let (u, v) = (factors(users, &mut rng), factors(items, &mut rng));
    let bias: Vec<f32> = (0..items).map(|_| rng.random_range(-0.5..0.5)).collect();
    let empty = || Ratings {
        users: Vec::new(),
        items: Vec::new(),
        ratings: Vec::new(),
        num_users: users,
        num_items: items,
    };
    let (mut train, mut test) = (empty(), empty());
    for user in 0..users {
        let mut seen: Vec<usize> = (0..items).collect();
        seen.shuffle(&mut rng);
        for &item in &seen[..per_user] {
            let r = 3.0
                + bias[item]
                + u[user][0] * v[item][0]
                + u[user][1] * v[item][1]
                + noise.sample(&mut rng);
            let into = if rng.random_bool(0.8) {
                &mut train
            } else {
                &mut test
            };
            into.users.push(u32::try_from(user).unwrap());
            into.items.push(u32::try_from(item).unwrap());
            into.ratings.push(r.clamp(1.0, 5.0));
        }
    }
    DataSet {
        train: Examples::Ratings(train),
        test: Examples::Ratings(test),
    }
}

#[test]
fn matrix_factorization_recovers_a_low_rank_matrix() {
    let data = low_rank_ratings(300, 200, 40);
    let mut spec = spec(ModelKind::MatrixFactorization);
    spec.rank = Some(4);
    spec.l2 = 0.01;
    let model = model::build(&spec, &data).unwrap();
    assert_eq!(model.metric_name(), "rmse");
    assert!(!model.higher_is_better());
    let rmse = sgd(model.as_ref(), &data, 20, 16, 2.0);
    println!("matrix factorization on rank-2 ratings, test RMSE per epoch: {rmse:.3?}");
    assert!(rmse[rmse.len() - 1] < 0.25, "{rmse:?}");
}

#[test]
fn kinds_that_do_not_fit_are_refused() {
    let ratings = low_rank_ratings(10, 10, 3);
    for kind in [ModelKind::SoftmaxRegression, ModelKind::Mlp] {
        let err = model::build(&spec(kind), &ratings).err().unwrap();
        assert!(
            matches!(
                err,
                model::ModelError::Mismatch {
                    data: "ratings",
                    ..
                }
            ),
            "{err}"
        );
    }
    let digits = digits();
    let err = model::build(&spec(ModelKind::MatrixFactorization), &digits)
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "spec.model.kind: MatrixFactorization cannot be trained on classification data"
    );
    for kind in [ModelKind::OnlineLinear, ModelKind::OnlineForest] {
        let err = model::build(&spec(kind), &digits).err().unwrap();
        assert!(matches!(err, model::ModelError::Unsupported(_)), "{err}");
    }
}
