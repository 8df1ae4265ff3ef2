//! Gaia's significance filter: which accumulated updates are worth sending
//! to the mirrors, how the threshold changes over time, and what each WAN
//! link may carry under the bandwidth-budget schedule.

use geoml_crds::sync_policy::{Significance, SignificanceFunction, ThresholdSchedule, WanBudget};

/// A significance function and its threshold schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    function: SignificanceFunction,
    schedule: ThresholdSchedule,
    initial: f64,
    floor: f64,
    decay_clocks: f64,
    /// What each link may carry (`BandwidthBudget`).
    budget: WanBudget,
    threshold: f64,
}

impl Filter {
    /// The filter a SyncPolicy describes: its `significance`, its WAN
    /// budget ([`geoml_crds::SyncPolicySpec::wan_budget`]) and its checked
    /// `significance.decayClocks`.
    #[must_use]
    pub fn new(spec: &Significance, budget: WanBudget, decay_clocks: u64) -> Self {
        Self {
            function: spec.function,
            schedule: spec.schedule,
            initial: spec.threshold,
            floor: spec.floor.unwrap_or(0.0),
            #[allow(clippy::cast_precision_loss)] // clock counts are far below 2^52
            decay_clocks: decay_clocks as f64,
            budget,
            threshold: spec.threshold,
        }
    }

    /// Takes a changed SyncPolicy's filter while training runs. The
    /// threshold restarts from the new initial one when that or the
    /// schedule changed (time-based schedules then place it at the current
    /// clock on their next [`Self::on_clock`]); otherwise it stays where the
    /// schedule had moved it.
    pub fn reconfigure(&mut self, new: &Self) {
        #[allow(clippy::float_cmp)] // did the spec's number change, not a computed one
        let restart = new.initial != self.initial || new.schedule != self.schedule;
        let threshold = self.threshold;
        *self = new.clone();
        if !restart {
            self.threshold = threshold;
        }
    }

    /// The current threshold: what is more significant leaves the
    /// accumulators for the links' queues (with `BandwidthBudget`, each link
    /// then sends the most significant of its queue that its budget allows,
    /// see [`super::budget`]).
    #[must_use]
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// How significant an accumulated update is against the current value:
    /// relative change is infinitely significant when the value is 0 (and
    /// something accumulated); nothing accumulated has significance 0.
    #[must_use]
    pub fn significance(&self, accumulated: f32, value: f32) -> f64 {
        if accumulated == 0.0 {
            return 0.0;
        }
        match self.function {
            SignificanceFunction::AbsoluteChange => f64::from(accumulated.abs()),
            SignificanceFunction::RelativeChange if value == 0.0 => f64::INFINITY,
            SignificanceFunction::RelativeChange => f64::from((accumulated / value).abs()),
        }
    }

    /// Whether an accumulated update is significant against the current
    /// value at the schedule's threshold.
    #[must_use]
    pub fn significant(&self, accumulated: f32, value: f32) -> bool {
        self.significance(accumulated, value) > self.threshold
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

    /// With the `BandwidthBudget` schedule, the bytes per second a link of
    /// `link_mbps` (its bandwidth, if shaped) may carry from one of the
    /// sending datacenter's `shards` parameter servers: its share of the
    /// link's budget. `None` with other schedules, or when the link has no
    /// budget.
    #[must_use]
    pub fn link_budget(&self, link_mbps: Option<f64>, shards: usize) -> Option<f64> {
        if self.schedule != ThresholdSchedule::BandwidthBudget {
            return None;
        }
        #[allow(clippy::cast_precision_loss)] // a handful of shards
        self.budget
            .of_link(link_mbps)
            .map(|mbps| mbps * 1e6 / 8.0 / shards.max(1) as f64)
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // thresholds are computed exactly
mod tests {
    use super::*;

    const EIGHT_MBPS: WanBudget = WanBudget {
        mbps: Some(8.0),
        share: 0.1,
    };

    fn filter(schedule: ThresholdSchedule, floor: Option<f64>, decay: Option<i64>) -> Filter {
        let spec = Significance {
            function: SignificanceFunction::RelativeChange,
            threshold: 0.04,
            schedule,
            floor,
            decay_clocks: decay,
        };
        let decay = decay.map_or(1, |d| u64::try_from(d).unwrap());
        Filter::new(&spec, EIGHT_MBPS, decay)
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
        let f = Filter::new(&spec, EIGHT_MBPS, 1);
        assert!(f.significant(0.05, 100.0));
        assert!(!f.significant(0.03, 0.0));
    }

    #[test]
    fn constant_stays_put_and_has_no_link_budget() {
        let mut f = filter(ThresholdSchedule::Constant, None, None);
        f.on_clock(10_000);
        assert_eq!(f.threshold(), 0.04);
        assert_eq!(f.link_budget(Some(20.0), 1), None);
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
        let spec = Significance {
            function: SignificanceFunction::RelativeChange,
            threshold: 0.04,
            schedule: ThresholdSchedule::BandwidthBudget,
            floor: None,
            decay_clocks: None,
        };
        // A new budget only: no restart, the new budget counts.
        let share = WanBudget {
            mbps: None,
            share: 0.5,
        };
        f.reconfigure(&Filter::new(&spec, share, 1));
        assert_eq!(
            f.link_budget(Some(16.0), 2),
            Some(16.0 * 0.5 * 1e6 / 8.0 / 2.0)
        );
        // A new threshold: it starts from there.
        let changed = Significance {
            threshold: 0.3,
            schedule: ThresholdSchedule::Constant,
            ..spec
        };
        f.reconfigure(&Filter::new(&changed, share, 1));
        assert_eq!(f.threshold(), 0.3);
        assert!(!f.significant(0.2, 1.0));
        assert!(f.significant(0.31, 1.0));
    }

    #[test]
    fn a_link_budget_is_shared_by_the_shards() {
        let f = filter(ThresholdSchedule::BandwidthBudget, None, None);
        // 8 Mbit/s is 1 MB/s, for two shards 0.5 MB/s each, whatever the link.
        assert_eq!(f.link_budget(Some(100.0), 2), Some(5e5));
        let share = WanBudget {
            mbps: None,
            share: 0.25,
        };
        let spec = Significance {
            schedule: ThresholdSchedule::BandwidthBudget,
            ..Significance::default()
        };
        let f = Filter::new(&spec, share, 1);
        assert_eq!(f.link_budget(Some(8.0), 1), Some(2.5e5));
        assert_eq!(f.link_budget(None, 1), None);
    }
}
