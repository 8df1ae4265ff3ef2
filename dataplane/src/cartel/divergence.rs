//! Jensen–Shannon divergence between distribution summaries, and the choice
//! of logical neighbours (the k sites with the smallest divergence).

/// Normalises `weights` into a probability distribution; all-zero or empty
/// input gives the uniform distribution.
#[must_use]
pub fn normalise(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    if total <= 0.0 {
        #[allow(clippy::cast_precision_loss)] // distribution lengths are small
        let uniform = 1.0 / weights.len().max(1) as f64;
        return vec![uniform; weights.len()];
    }
    weights
        .iter()
        .map(|&w| {
            if w.is_finite() && w > 0.0 {
                w / total
            } else {
                0.0
            }
        })
        .collect()
}

/// Jensen–Shannon divergence in bits between two histograms (normalised
/// first), in [0, 1]. A shorter histogram is padded with zeros.
#[must_use]
pub fn jensen_shannon(p: &[f64], q: &[f64]) -> f64 {
    let n = p.len().max(q.len());
    if n == 0 {
        return 0.0;
    }
    let pad = |v: &[f64]| {
        let mut v = v.to_vec();
        v.resize(n, 0.0);
        normalise(&v)
    };
    let (p, q) = (pad(p), pad(q));
    let kl_to_mean = |a: &[f64], b: &[f64]| -> f64 {
        a.iter()
            .zip(b)
            .filter(|(x, _)| **x > 0.0)
            .map(|(x, y)| {
                let m = 0.5 * (x + y);
                x * (x / m).log2()
            })
            .sum()
    };
    (0.5 * kl_to_mean(&p, &q) + 0.5 * kl_to_mean(&q, &p)).clamp(0.0, 1.0)
}

/// A site's summaries as the registry compares them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Class priors.
    pub class_priors: Vec<f64>,
    /// Feature histogram; empty when the site does not publish one.
    pub feature_histogram: Vec<f64>,
}

impl Summary {
    /// JS divergence of the class priors plus, when both publish one, that
    /// of the feature histograms.
    #[must_use]
    pub fn divergence(&self, other: &Summary) -> f64 {
        let priors = jensen_shannon(&self.class_priors, &other.class_priors);
        if self.feature_histogram.is_empty() || other.feature_histogram.is_empty() {
            priors
        } else {
            priors + jensen_shannon(&self.feature_histogram, &other.feature_histogram)
        }
    }
}

/// The `k` candidates closest to `me`, closest first, as `(name,
/// divergence)`; the site named `me_name` is never its own neighbour. Ties
/// go to the name that sorts first, so the choice is deterministic.
#[must_use]
pub fn nearest<'a>(
    me_name: &str,
    me: &Summary,
    candidates: impl IntoIterator<Item = (&'a str, &'a Summary)>,
    k: usize,
) -> Vec<(String, f64)> {
    let mut scored: Vec<(String, f64)> = candidates
        .into_iter()
        .filter(|(name, _)| *name != me_name)
        .map(|(name, s)| (name.to_owned(), me.divergence(s)))
        .collect();
    scored.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

/// Total variation distance between two histograms (normalised first): how
/// far a site's priors moved since it last published them.
#[must_use]
pub fn total_variation(p: &[f64], q: &[f64]) -> f64 {
    let n = p.len().max(q.len());
    let pad = |v: &[f64]| {
        let mut v = v.to_vec();
        v.resize(n, 0.0);
        normalise(&v)
    };
    let (p, q) = (pad(p), pad(q));
    0.5 * p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_is_zero_disjoint_is_one() {
        assert!(jensen_shannon(&[0.2, 0.8], &[2.0, 8.0]).abs() < 1e-12);
        assert!((jensen_shannon(&[1.0, 0.0], &[0.0, 1.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn symmetric_and_matches_a_hand_computed_value() {
        let (p, q) = ([0.5, 0.5], [0.9, 0.1]);
        let d = jensen_shannon(&p, &q);
        assert!((d - jensen_shannon(&q, &p)).abs() < 1e-12);
        // m = (0.7, 0.3): 0.5*(0.5 lg(.5/.7) + 0.5 lg(.5/.3)) + 0.5*(0.9 lg(.9/.7) + 0.1 lg(.1/.3))
        let expected = 0.5 * (0.5 * (0.5f64 / 0.7).log2() + 0.5 * (0.5f64 / 0.3).log2())
            + 0.5 * (0.9 * (0.9f64 / 0.7).log2() + 0.1 * (0.1f64 / 0.3).log2());
        assert!((d - expected).abs() < 1e-12, "{d} vs {expected}");
    }

    #[test]
    fn neighbours_are_the_k_closest_and_never_self() {
        let s = |p: &[f64]| Summary {
            class_priors: p.to_vec(),
            feature_histogram: Vec::new(),
        };
        let me = s(&[0.5, 0.5, 0.0]);
        let sites = [
            ("me", s(&[0.5, 0.5, 0.0])),
            ("far", s(&[0.0, 0.0, 1.0])),
            ("near", s(&[0.45, 0.55, 0.0])),
            ("mid", s(&[0.3, 0.3, 0.4])),
        ];
        let got = nearest("me", &me, sites.iter().map(|(n, s)| (*n, s)), 2);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["near", "mid"]);
        assert!(got[0].1 < got[1].1);
    }

    #[test]
    fn total_variation_of_a_shift() {
        assert!((total_variation(&[1.0, 0.0], &[0.5, 0.5]) - 0.5).abs() < 1e-12);
    }
}
