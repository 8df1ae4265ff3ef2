//! The stopping rule: a clock budget, a target metric, or a model that has
//! stopped changing.

use geoml_crds::training_job::StoppingRule as StoppingSpec;

/// A checked stopping rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoppingRule {
    max_clocks: Option<u64>,
    target: Option<f64>,
    higher_is_better: bool,
    min_relative_change: Option<f64>,
}

impl StoppingRule {
    /// The rule of a job's spec with its checked clock budget (the
    /// plan's `max_clocks`), for a metric where higher (accuracy) or lower
    /// (RMSE) is better.
    #[must_use]
    pub fn new(spec: &StoppingSpec, max_clocks: Option<u64>, higher_is_better: bool) -> Self {
        Self {
            max_clocks,
            target: spec.target_metric,
            higher_is_better,
            min_relative_change: spec.min_relative_change,
        }
    }

    /// The clock budget, if any.
    #[must_use]
    pub fn max_clocks(&self) -> Option<u64> {
        self.max_clocks
    }

    /// Whether `metric` meets the target.
    #[must_use]
    pub fn reached_target(&self, metric: f64) -> bool {
        self.target.is_some_and(|t| {
            if self.higher_is_better {
                metric >= t
            } else {
                metric <= t
            }
        })
    }

    /// Why training should stop after the slowest worker completed
    /// `min_clock` iterations.
    #[must_use]
    pub fn on_clock(&self, min_clock: u64) -> Option<String> {
        self.max_clocks
            .filter(|&max| min_clock >= max)
            .map(|max| format!("clock budget of {max} reached"))
    }

    /// Why training should stop after an evaluation.
    #[must_use]
    pub fn on_report(&self, metric: f64, model_change: f64) -> Option<String> {
        if self.reached_target(metric) {
            return Some(format!("target metric reached ({metric:.4})"));
        }
        self.min_relative_change
            .filter(|&min| model_change < min)
            .map(|min| format!("model change {model_change:.2e} below {min:.2e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(higher: bool) -> StoppingRule {
        StoppingRule::new(
            &StoppingSpec {
                max_clocks: Some(10),
                target_metric: Some(0.9),
                min_relative_change: Some(1e-4),
            },
            Some(10),
            higher,
        )
    }

    #[test]
    fn each_rule_stops_training() {
        assert_eq!(rule(true).on_clock(9), None);
        assert!(rule(true).on_clock(10).is_some());
        assert!(rule(true).on_report(0.91, 1.0).is_some());
        assert_eq!(rule(true).on_report(0.85, 1.0), None);
        assert!(rule(true).on_report(0.85, 1e-5).is_some());
        // For RMSE lower is better.
        assert!(rule(false).on_report(0.85, 1.0).is_some());
        assert_eq!(rule(false).on_report(0.95, 1.0), None);
    }
}
