//! Splitting training examples over datacenters (IID, by site, Dirichlet).
//!
//! See [`super::partition`] for what each scheme does. Randomness comes
//! from [`SplitMix64`] seeded with the caller's seed, so a partition is the
//! same on every machine and in every process of a job.

use geoml_crds::training_job::{PartitionScheme, Partitioning};
use rand::RngCore;
use rand_distr::{Distribution, Gamma};

use super::Examples;
use super::rng::{SplitMix64, shuffle};

/// Concentration used when a Dirichlet partitioning has no usable alpha.
const DEFAULT_ALPHA: f64 = 1.0;

/// Implements [`super::partition`].
pub(super) fn partition(
    train: &Examples,
    parts: usize,
    partitioning: &Partitioning,
    seed: u64,
) -> Vec<Vec<usize>> {
    if parts == 0 {
        return Vec::new();
    }
    let n = train.len();
    let mut rng = SplitMix64::new(seed);
    let mut out = match (partitioning.scheme, train) {
        (PartitionScheme::Iid, _) | (PartitionScheme::BySite, Examples::Classification(_)) => {
            iid(n, parts, &mut rng)
        }
        (PartitionScheme::Dirichlet, Examples::Classification(c)) => {
            let alpha = usable_alpha(partitioning.alpha);
            by_label_dirichlet(&c.labels, c.classes, parts, alpha, &mut rng)
        }
        (PartitionScheme::Dirichlet, Examples::Ratings(r)) => {
            let alpha = usable_alpha(partitioning.alpha);
            by_user_dirichlet(&r.users, parts, alpha, &mut rng)
        }
        (PartitionScheme::BySite, Examples::Ratings(r)) => by_user_modulo(&r.users, parts),
    };
    fill_empty_parts(&mut out);
    for part in &mut out {
        part.sort_unstable();
    }
    out
}

/// `alpha` if it is a positive finite number, else [`DEFAULT_ALPHA`].
fn usable_alpha(alpha: Option<f64>) -> f64 {
    match alpha {
        Some(a) if a.is_finite() && a > 0.0 => a,
        other => {
            tracing::warn!(alpha = ?other, "Dirichlet partitioning without a positive alpha; using 1");
            DEFAULT_ALPHA
        }
    }
}

/// A seeded shuffle of `0..n` cut into `parts` chunks whose sizes differ by
/// at most one.
fn iid(n: usize, parts: usize, rng: &mut SplitMix64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, rng);
    let (base, extra) = (n / parts, n % parts);
    let mut rest = &order[..];
    (0..parts)
        .map(|p| {
            let (chunk, tail) = rest.split_at(base + usize::from(p < extra));
            rest = tail;
            chunk.to_vec()
        })
        .collect()
}

/// Deals each class's examples over the parts in proportions drawn from
/// Dirichlet(alpha), independently for each class.
fn by_label_dirichlet(
    labels: &[u16],
    classes: usize,
    parts: usize,
    alpha: f64,
    rng: &mut SplitMix64,
) -> Vec<Vec<usize>> {
    let classes = labels
        .iter()
        .map(|&l| usize::from(l) + 1)
        .max()
        .unwrap_or(0)
        .max(classes);
    let mut by_class = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    let mut out = vec![Vec::new(); parts];
    for mut members in by_class {
        shuffle(&mut members, rng);
        let shares = dirichlet(parts, alpha, rng);
        let mut start = 0;
        let mut cumulative = 0.0;
        for (p, share) in shares.iter().enumerate() {
            cumulative += share;
            let end = if p + 1 == parts {
                members.len()
            } else {
                count_for(cumulative, members.len()).clamp(start, members.len())
            };
            out[p].extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    out
}

/// Assigns each user, with all its ratings, to a part drawn from
/// proportions that are themselves drawn from Dirichlet(alpha).
fn by_user_dirichlet(
    users: &[u32],
    parts: usize,
    alpha: f64,
    rng: &mut SplitMix64,
) -> Vec<Vec<usize>> {
    let shares = dirichlet(parts, alpha, rng);
    let mut distinct: Vec<u32> = users.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let part_of: std::collections::HashMap<u32, usize> = distinct
        .into_iter()
        .map(|u| (u, categorical(&shares, rng)))
        .collect();
    let mut out = vec![Vec::new(); parts];
    for (i, u) in users.iter().enumerate() {
        out[part_of.get(u).copied().unwrap_or(0)].push(i);
    }
    out
}

/// User `u`'s ratings go to part `u % parts`.
fn by_user_modulo(users: &[u32], parts: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); parts];
    for (i, &u) in users.iter().enumerate() {
        // A u32 always fits in usize on the platforms geoml runs on (64-bit).
        out[usize::try_from(u).unwrap_or(usize::MAX) % parts].push(i);
    }
    out
}

/// How many of `total` examples fall below the cumulative share `cumulative`.
fn count_for(cumulative: f64, total: usize) -> usize {
    // Counts are far below 2^52, so the conversions are exact; the value is
    // clamped to [0, total] before converting back.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let count = (cumulative * total as f64).round().clamp(0.0, total as f64) as usize;
    count
}

/// A draw from the symmetric Dirichlet(alpha) over `parts` outcomes, as
/// normalised Gamma(alpha, 1) draws (`rand_distr`'s `Dirichlet` needs the
/// number of outcomes at compile time).
fn dirichlet(parts: usize, alpha: f64, rng: &mut SplitMix64) -> Vec<f64> {
    let draws: Vec<f64> = match Gamma::new(alpha, 1.0) {
        Ok(gamma) => (0..parts).map(|_| gamma.sample(rng)).collect(),
        Err(_) => vec![1.0; parts],
    };
    let sum: f64 = draws.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        draws.into_iter().map(|d| d / sum).collect()
    } else {
        // With a tiny alpha every draw can underflow to 0: the limit is all
        // mass on one outcome.
        let winner = uniform_index(parts, rng);
        (0..parts)
            .map(|p| if p == winner { 1.0 } else { 0.0 })
            .collect()
    }
}

/// An index drawn with probabilities `shares` (which sum to 1).
fn categorical(shares: &[f64], rng: &mut SplitMix64) -> usize {
    // 53 random bits make a uniform f64 in [0, 1).
    #[allow(clippy::cast_precision_loss)]
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut cumulative = 0.0;
    for (i, share) in shares.iter().enumerate() {
        cumulative += share;
        if u < cumulative {
            return i;
        }
    }
    // Rounding left `u` above the total: take the last part with any share.
    shares.iter().rposition(|&s| s > 0.0).unwrap_or(0)
}

/// A uniform index below `n` (which is at least 1).
fn uniform_index(n: usize, rng: &mut SplitMix64) -> usize {
    let n64 = u64::try_from(n).unwrap_or(u64::MAX);
    usize::try_from(rng.below(n64)).unwrap_or(0)
}

/// When there are at least as many examples as parts, moves one example
/// from the largest part into each empty part.
fn fill_empty_parts(out: &mut [Vec<usize>]) {
    let total: usize = out.iter().map(Vec::len).sum();
    if total < out.len() {
        return;
    }
    while let Some(empty) = out.iter().position(Vec::is_empty) {
        let Some(largest) = (0..out.len()).max_by_key(|&p| (out[p].len(), std::cmp::Reverse(p)))
        else {
            return;
        };
        // With total >= parts and a part empty, the largest holds at least 2.
        let Some(moved) = out[largest].pop() else {
            return;
        };
        out[empty].push(moved);
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::super::{Classification, Ratings};
    use super::*;

    fn scheme(scheme: PartitionScheme, alpha: Option<f64>) -> Partitioning {
        Partitioning { scheme, alpha }
    }

    fn all_schemes() -> Vec<Partitioning> {
        vec![
            scheme(PartitionScheme::Iid, None),
            scheme(PartitionScheme::BySite, None),
            scheme(PartitionScheme::Dirichlet, Some(0.1)),
            scheme(PartitionScheme::Dirichlet, Some(100.0)),
            scheme(PartitionScheme::Dirichlet, None),
        ]
    }

    /// `n` examples of `classes` classes, label `i % classes`.
    fn classification(n: usize, classes: usize) -> Examples {
        Examples::Classification(Classification {
            features: Array2::zeros((n, 2)),
            labels: (0..n)
                .map(|i| u16::try_from(i % classes).unwrap())
                .collect(),
            classes,
        })
    }

    /// `n` ratings by `users` users, user `(i * 7) % users`.
    fn ratings(n: usize, users: usize) -> Examples {
        Examples::Ratings(Ratings {
            users: (0..n)
                .map(|i| u32::try_from((i * 7) % users).unwrap())
                .collect(),
            items: vec![0; n],
            ratings: vec![3.0; n],
            num_users: users,
            num_items: 1,
        })
    }

    fn assert_covers_once(out: &[Vec<usize>], n: usize, parts: usize) {
        assert_eq!(out.len(), parts);
        let mut all: Vec<usize> = out.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        if n >= parts {
            assert!(out.iter().all(|p| !p.is_empty()), "empty part in {out:?}");
        }
        for part in out {
            assert!(part.windows(2).all(|w| w[0] < w[1]), "part not ascending");
        }
    }

    #[test]
    fn every_scheme_covers_every_index_exactly_once() {
        for p in all_schemes() {
            for parts in [1, 2, 3, 7, 10] {
                for n in [0, 1, 5, 7, 10, 500] {
                    for data in [classification(n, 10), ratings(n, 13)] {
                        let out = partition(&data, parts, &p, 42);
                        assert_covers_once(&out, n, parts);
                    }
                }
            }
        }
    }

    #[test]
    fn zero_parts_is_empty() {
        assert!(partition(&classification(5, 2), 0, &Partitioning::default(), 1).is_empty());
    }

    #[test]
    fn every_scheme_is_deterministic_in_the_seed() {
        for p in all_schemes() {
            for data in [classification(1000, 10), ratings(1000, 50)] {
                let a = partition(&data, 4, &p, 7);
                assert_eq!(a, partition(&data, 4, &p, 7), "{p:?}");
            }
        }
        let data = classification(1000, 10);
        let iid = Partitioning::default();
        assert_ne!(partition(&data, 4, &iid, 7), partition(&data, 4, &iid, 8));
    }

    #[test]
    fn iid_parts_differ_by_at_most_one() {
        let out = partition(&classification(1003, 10), 4, &Partitioning::default(), 3);
        let sizes: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![251, 251, 251, 250]);
    }

    /// Mean over parts of the total-variation distance between the part's
    /// class histogram and the global one.
    fn mean_label_skew(labels: &[u16], classes: usize, out: &[Vec<usize>]) -> f64 {
        let histogram = |indices: &mut dyn Iterator<Item = usize>| {
            let mut h = vec![0.0; classes];
            let mut n = 0.0;
            for i in indices {
                h[usize::from(labels[i])] += 1.0;
                n += 1.0;
            }
            h.into_iter().map(|c| c / n).collect::<Vec<f64>>()
        };
        let global = histogram(&mut (0..labels.len()));
        let distances: Vec<f64> = out
            .iter()
            .map(|part| {
                let local = histogram(&mut part.iter().copied());
                0.5 * local
                    .iter()
                    .zip(&global)
                    .map(|(a, b)| (a - b).abs())
                    .sum::<f64>()
            })
            .collect();
        distances.iter().sum::<f64>() / f64::from(u32::try_from(distances.len()).unwrap())
    }

    #[test]
    fn small_alpha_dirichlet_is_more_skewed_than_iid() {
        let data = classification(5000, 10);
        let Examples::Classification(c) = &data else {
            unreachable!()
        };
        let skew = |p: Partitioning| {
            let out = partition(&data, 5, &p, 11);
            mean_label_skew(&c.labels, 10, &out)
        };
        let iid = skew(Partitioning::default());
        let flat = skew(scheme(PartitionScheme::Dirichlet, Some(1000.0)));
        let skewed = skew(scheme(PartitionScheme::Dirichlet, Some(0.1)));
        eprintln!(
            "mean TV distance to the global class histogram: IID {iid:.3}, Dirichlet(1000) {flat:.3}, Dirichlet(0.1) {skewed:.3}"
        );
        assert!(iid < 0.1, "IID skew {iid}");
        assert!(flat < 0.1, "Dirichlet(1000) skew {flat}");
        assert!(
            skewed > 0.4 && skewed > 5.0 * iid,
            "Dirichlet(0.1) skew {skewed}"
        );
    }

    #[test]
    fn by_site_keeps_each_user_in_part_user_mod_parts() {
        let data = ratings(1000, 50);
        let Examples::Ratings(r) = &data else {
            unreachable!()
        };
        let out = partition(&data, 4, &scheme(PartitionScheme::BySite, None), 0);
        for (p, part) in out.iter().enumerate() {
            assert!(part.iter().all(|&i| r.users[i] as usize % 4 == p));
        }
    }

    #[test]
    fn dirichlet_on_ratings_keeps_each_user_in_one_part() {
        let data = ratings(2000, 100);
        let Examples::Ratings(r) = &data else {
            unreachable!()
        };
        let out = partition(&data, 5, &scheme(PartitionScheme::Dirichlet, Some(1.0)), 9);
        let mut part_of = std::collections::HashMap::new();
        for (p, part) in out.iter().enumerate() {
            for &i in part {
                assert_eq!(*part_of.entry(r.users[i]).or_insert(p), p, "user split");
            }
        }
    }

    #[test]
    fn tiny_alpha_still_leaves_no_part_empty() {
        for seed in 0..20 {
            let out = partition(
                &classification(30, 3),
                6,
                &scheme(PartitionScheme::Dirichlet, Some(1e-6)),
                seed,
            );
            assert_covers_once(&out, 30, 6);
        }
    }
}
