//! Gaia's significance filter: which accumulated updates are worth sending
//! to the mirrors, how the threshold changes over time, and how the
//! bandwidth-budget schedule steers one threshold per WAN link.

use geoml_crds::sync_policy::{Significance, SignificanceFunction, ThresholdSchedule, WanBudget};

/// Lowest threshold the bandwidth-budget schedule steers a link down to.
const MIN_THRESHOLD: f64 = 1e-4;

/// Highest threshold the bandwidth-budget schedule steers a link up to.
const MAX_THRESHOLD: f64 = 10.0;

/// How hard the bandwidth-budget schedule steers: after a window in which a
/// link carried `rate` against its `budget`, its threshold is multiplied by
/// `(rate / budget)^GAIN`. Sending falls roughly as the threshold rises
/// (rate ∝ 1/threshold for steady deltas), so a gain of 1/2 closes half the
/// gap, in log terms, per window, and stays stable when the response is up
/// to four times as steep or lags a window.
const GAIN: f64 = 0.5;

/// The most one window moves a link's threshold, up or down (a window that
/// sent nothing halves it).
const MAX_STEP: f64 = 2.0;

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
    /// schedule had moved it, so a new WAN budget steers from there.
    /// Returns whether it restarted.
    pub fn reconfigure(&mut self, new: &Self) -> bool {
        #[allow(clippy::float_cmp)] // did the spec's number change, not a computed one
        let restart = new.initial != self.initial || new.schedule != self.schedule;
        let threshold = self.threshold;
        *self = new.clone();
        if !restart {
            self.threshold = threshold;
        }
        restart
    }

    /// The threshold of the schedule (with `BandwidthBudget`, the one every
    /// link starts from).
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

/// The bandwidth-budget schedule's step: the threshold of a link that
/// carried `bytes_per_second` over the last window against a budget of
/// `budget` bytes per second. Multiplicative (integral control of the
/// threshold's logarithm): up when the link carried more than its budget,
/// down when less, by `(rate / budget)^GAIN`, at most [`MAX_STEP`] either way,
/// within [[`MIN_THRESHOLD`], [`MAX_THRESHOLD`]].
#[must_use]
pub fn steer(threshold: f64, bytes_per_second: f64, budget: f64) -> f64 {
    let factor = (bytes_per_second / budget)
        .powf(GAIN)
        .clamp(1.0 / MAX_STEP, MAX_STEP);
    if factor.is_nan() {
        return threshold;
    }
    (threshold * factor).clamp(MIN_THRESHOLD, MAX_THRESHOLD)
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
        assert!(!f.reconfigure(&Filter::new(&spec, share, 1)));
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
        assert!(f.reconfigure(&Filter::new(&changed, share, 1)));
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

    #[test]
    fn steering_moves_the_threshold_against_the_error_within_bounds() {
        assert_eq!(steer(0.01, 4e6, 1e6), 0.02);
        assert_eq!(steer(0.01, 1e6, 4e6), 0.005);
        assert_eq!(steer(0.01, 1e6, 1e6), 0.01);
        // At most a factor of 2 a window; nothing sent halves it.
        assert_eq!(steer(0.01, 1e12, 1.0), 0.02);
        assert_eq!(steer(0.01, 0.0, 1.0), 0.005);
        assert_eq!(steer(MIN_THRESHOLD, 0.0, 1.0), MIN_THRESHOLD);
        assert_eq!(steer(MAX_THRESHOLD, 1e12, 1.0), MAX_THRESHOLD);
    }

    /// A deterministic stand-in for a shard's updates: element i moves by
    /// a delta of its own size (spread over three orders of magnitude,
    /// sign flipping now and then) every clock, against a value of 1.
    fn delta(i: usize, clock: u64) -> f32 {
        #[allow(clippy::cast_precision_loss)]
        let size = 1e-4 * (1.0 + (i * 7919 % 1000) as f32);
        let flip = (i as u64 * 31 + clock).is_multiple_of(17);
        if flip { -size } else { size }
    }

    #[test]
    fn the_budget_controller_converges_on_a_synthetic_update_stream() {
        // 2000 elements, 100 clocks a second, one window a second; an
        // update costs 5 bytes an element plus 40 for the message. Every
        // element changing every clock by its delta, Gaia's 1% sends about
        // 150 kB/s; the budget is 30 kB/s.
        const ELEMENTS: usize = 2000;
        const CLOCKS_PER_WINDOW: u64 = 100;
        let budget = 30_000.0;
        let mut accumulated = vec![0.0f32; ELEMENTS];
        let mut threshold = 0.01;
        let mut rates = Vec::new();
        for window in 0..60u64 {
            let mut bytes = 0.0;
            for c in 0..CLOCKS_PER_WINDOW {
                let clock = window * CLOCKS_PER_WINDOW + c;
                let mut sent = 0;
                for (i, acc) in accumulated.iter_mut().enumerate() {
                    *acc += delta(i, clock);
                    if f64::from(acc.abs()) > threshold {
                        *acc = 0.0;
                        sent += 1;
                    }
                }
                if sent > 0 {
                    bytes += 40.0 + 5.0 * f64::from(sent);
                }
            }
            // One window lasts a second.
            rates.push(bytes);
            threshold = steer(threshold, bytes, budget);
        }
        assert!(rates[0] > 3.0 * budget, "Gaia's 1% sends {}", rates[0]);
        // Settled after a third of the run: every window within ±15%.
        for (window, rate) in rates.iter().enumerate().skip(20) {
            assert!(
                (rate / budget - 1.0).abs() <= 0.15,
                "window {window}: {rate} B/s against {budget}"
            );
        }
    }
}
