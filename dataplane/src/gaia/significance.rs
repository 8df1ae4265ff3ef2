//! Gaia's significance filter: which accumulated updates are worth sending
//! to the mirrors, and how the threshold changes over time.

use geoml_crds::sync_policy::{Significance, SignificanceFunction, ThresholdSchedule};

/// Lowest threshold the bandwidth-budget schedule goes down to.
const MIN_THRESHOLD: f64 = 1e-4;

/// Factor by which the bandwidth-budget schedule nudges the threshold.
const NUDGE: f64 = 1.25;

/// A significance function and its threshold schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    function: SignificanceFunction,
    schedule: ThresholdSchedule,
    initial: f64,
    floor: f64,
    decay_clocks: f64,
    /// Bytes per second each link may carry (`BandwidthBudget`).
    budget: Option<f64>,
    threshold: f64,
}

impl Filter {
    /// The filter a SyncPolicy describes; `budget_mbps` is its
    /// `wanBudgetMbps`, `decay_clocks` its checked `significance.decayClocks`.
    #[must_use]
    pub fn new(spec: &Significance, budget_mbps: Option<f64>, decay_clocks: u64) -> Self {
        Self {
            function: spec.function,
            schedule: spec.schedule,
            initial: spec.threshold,
            floor: spec.floor.unwrap_or(0.0),
            #[allow(clippy::cast_precision_loss)] // clock counts are far below 2^52
            decay_clocks: decay_clocks as f64,
            budget: budget_mbps.map(|mbps| mbps * 1e6 / 8.0),
            threshold: spec.threshold,
        }
    }

    /// Takes a changed SyncPolicy's filter while training runs. The
    /// threshold restarts from the new initial one when that or the
    /// schedule changed (time-based schedules then place it at the current
    /// clock on their next [`Self::on_clock`]); otherwise it stays where the
    /// schedule had moved it, so a new WAN budget nudges from there.
    pub fn reconfigure(&mut self, new: &Self) {
        #[allow(clippy::float_cmp)] // did the spec's number change, not a computed one
        let restart = new.initial != self.initial || new.schedule != self.schedule;
        let threshold = self.threshold;
        *self = new.clone();
        if !restart {
            self.threshold = threshold;
        }
    }

    /// The current threshold.
    #[must_use]
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Whether an accumulated update is significant against the current value.
    /// Relative change is always significant when the value is 0 (and
    /// something accumulated); nothing accumulated is never significant.
    #[must_use]
    pub fn significant(&self, accumulated: f32, value: f32) -> bool {
        if accumulated == 0.0 {
            return false;
        }
        let significance = match self.function {
            SignificanceFunction::AbsoluteChange => f64::from(accumulated.abs()),
            SignificanceFunction::RelativeChange if value == 0.0 => return true,
            SignificanceFunction::RelativeChange => f64::from((accumulated / value).abs()),
        };
        significance > self.threshold
    }

    /// Moves the threshold to clock `clock` (time-based schedules).
    pub fn on_clock(&mut self, clock: u64) {
        #[allow(clippy::cast_precision_loss)] // clock counts are far below 2^52
        let t = clock.max(1) as f64;
        match self.schedule {
            ThresholdSchedule::Constant | ThresholdSchedule::BandwidthBudget => {}
            ThresholdSchedule::InverseSqrt => self.threshold = self.initial / t.sqrt(),
            ThresholdSchedule::LinearToFloor => {
                let progress = (t / self.decay_clocks).min(1.0);
                self.threshold = self.initial - (self.initial - self.floor) * progress;
            }
        }
    }

    /// Nudges the threshold (`BandwidthBudget`) after the busiest link carried
    /// `bytes_per_second`: up when above 1.1× the budget, down when below 0.9×.
    pub fn on_rate(&mut self, bytes_per_second: f64) {
        let (ThresholdSchedule::BandwidthBudget, Some(budget)) = (self.schedule, self.budget)
        else {
            return;
        };
        if bytes_per_second > 1.1 * budget {
            self.threshold = (self.threshold * NUDGE).min(1.0);
        } else if bytes_per_second < 0.9 * budget {
            self.threshold = (self.threshold / NUDGE).max(MIN_THRESHOLD);
        }
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // thresholds are computed exactly
mod tests {
    use super::*;

    fn filter(schedule: ThresholdSchedule, floor: Option<f64>, decay: Option<i64>) -> Filter {
        let spec = Significance {
            function: SignificanceFunction::RelativeChange,
            threshold: 0.04,
            schedule,
            floor,
            decay_clocks: decay,
        };
        let decay = decay.map_or(1, |d| u64::try_from(d).unwrap());
        Filter::new(&spec, Some(8.0), decay)
    }

    #[test]
    fn relative_change_is_accumulated_over_value() {
        let f = filter(ThresholdSchedule::Constant, None, None);
        assert!(f.significant(0.05, 1.0));
        assert!(f.significant(-0.05, 1.0));
        assert!(!f.significant(0.03, 1.0));
        assert!(!f.significant(0.03, -1.0));
        // Always significant at value 0, never with nothing accumulated.
        assert!(f.significant(1e-9, 0.0));
        assert!(!f.significant(0.0, 0.0));
        assert!(!f.significant(0.0, 1e-9));
    }

    #[test]
    fn absolute_change_ignores_the_value() {
        let spec = Significance {
            function: SignificanceFunction::AbsoluteChange,
            threshold: 0.04,
            ..Significance::default()
        };
        let f = Filter::new(&spec, None, 1);
        assert!(f.significant(0.05, 100.0));
        assert!(!f.significant(0.03, 0.0));
    }

    #[test]
    fn constant_stays_put() {
        let mut f = filter(ThresholdSchedule::Constant, None, None);
        f.on_clock(10_000);
        f.on_rate(1e12);
        assert_eq!(f.threshold(), 0.04);
    }

    #[test]
    fn inverse_sqrt_decays_with_the_clock() {
        let mut f = filter(ThresholdSchedule::InverseSqrt, None, None);
        f.on_clock(0);
        assert_eq!(f.threshold(), 0.04);
        f.on_clock(4);
        assert_eq!(f.threshold(), 0.02);
        f.on_clock(100);
        assert!((f.threshold() - 0.004).abs() < 1e-12);
    }

    #[test]
    fn linear_reaches_the_floor_and_stays() {
        let mut f = filter(ThresholdSchedule::LinearToFloor, Some(0.01), Some(100));
        f.on_clock(50);
        assert!((f.threshold() - 0.025).abs() < 1e-12);
        f.on_clock(100);
        assert!((f.threshold() - 0.01).abs() < 1e-12);
        f.on_clock(1000);
        assert!((f.threshold() - 0.01).abs() < 1e-12);
    }

    #[test]
    fn reconfiguring_restarts_the_threshold_only_when_it_or_the_schedule_changed() {
        let mut f = filter(ThresholdSchedule::BandwidthBudget, None, None);
        f.on_rate(2e6);
        let nudged = f.threshold();
        assert!(nudged > 0.04);
        // A new budget only: the nudged threshold stays, the budget is new.
        let spec = Significance {
            function: SignificanceFunction::RelativeChange,
            threshold: 0.04,
            schedule: ThresholdSchedule::BandwidthBudget,
            floor: None,
            decay_clocks: None,
        };
        f.reconfigure(&Filter::new(&spec, Some(80.0), 1));
        assert_eq!(f.threshold(), nudged);
        f.on_rate(2e6); // below 0.9× the new 10 MB/s
        assert!(f.threshold() < nudged);
        // A new threshold: it starts from there.
        f.reconfigure(&Filter::new(
            &Significance {
                threshold: 0.3,
                schedule: ThresholdSchedule::Constant,
                ..spec
            },
            None,
            1,
        ));
        assert_eq!(f.threshold(), 0.3);
        assert!(!f.significant(0.2, 1.0));
        assert!(f.significant(0.31, 1.0));
    }

    #[test]
    fn bandwidth_budget_nudges_toward_the_budget() {
        // 8 Mbit/s is 1 MB/s.
        let mut f = filter(ThresholdSchedule::BandwidthBudget, None, None);
        f.on_rate(2e6);
        assert!(f.threshold() > 0.04);
        let raised = f.threshold();
        f.on_rate(1e6); // within 0.9–1.1×: unchanged
        assert_eq!(f.threshold(), raised);
        for _ in 0..200 {
            f.on_rate(0.0);
        }
        assert_eq!(f.threshold(), MIN_THRESHOLD);
        for _ in 0..200 {
            f.on_rate(1e9);
        }
        assert_eq!(f.threshold(), 1.0);
        // Time does not move it.
        f.on_clock(1_000_000);
        assert_eq!(f.threshold(), 1.0);
    }
}
