//! What a WAN link may carry under the `BandwidthBudget` schedule: a byte
//! allowance that fills at the link's budget and empties by what the shard
//! puts on the link, framing included, and how many of the most
//! significant queued elements the next update may hold.
//!
//! It is a token bucket, so the rate it lets through is the budget exactly
//! for the bytes it counts, with no gain to tune: a link that sent more
//! than it had (an estimate came out short, an announced update had to go,
//! training stopped and everything left was flushed) owes it, and waits
//! until the allowance is positive again.

use std::time::{Duration, Instant};

use geoml_crds::sync_policy::ValueCoding;

/// Bytes a gRPC call adds to its message on the wire, in each direction:
/// the HTTP/2 HEADERS frame (method, path, deadline; mostly indexes into
/// HPACK's table once the connection is warm), the DATA frame's header and
/// gRPC's 5-byte prefix, and on the way back the response's headers, its
/// empty message and trailers. Measured against the WAN emulator's byte
/// counts (`runtime/tests/gaia.rs`); an estimate, not a count.
pub const CALL_BYTES: u64 = 64;

/// Index bytes an element adds to an update, on average: its gap to the
/// previous index as a varint, one to three bytes for a shard's sizes.
const INDEX_BYTES: f64 = 2.0;

/// Seconds of budget a link saves up while it has nothing to send: enough
/// for the next update after a round trip, not enough to burst far above
/// the budget after a quiet spell.
const BURST_SECONDS: f64 = 0.5;

/// One link's allowance.
#[derive(Clone, Debug, PartialEq)]
pub struct Allowance {
    /// Bytes per second: the budget.
    rate: f64,
    /// Bytes the link may still carry, as of `at` (negative: owed).
    credit: f64,
    at: Instant,
}

impl Allowance {
    /// A full allowance of `rate` bytes per second, at `now`.
    #[must_use]
    pub fn new(rate: f64, now: Instant) -> Self {
        Self {
            rate,
            credit: rate * BURST_SECONDS,
            at: now,
        }
    }

    /// The budget, in bytes per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes a new budget from `now` on, keeping what is saved or owed.
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.credit = self.credit(now);
        self.at = now;
        self.rate = rate;
    }

    /// Bytes the link may carry at `now` (negative: owed).
    #[must_use]
    pub fn credit(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.credit + self.rate * elapsed).min(self.rate * BURST_SECONDS)
    }

    /// The link carried `bytes` at `now`.
    pub fn spend(&mut self, bytes: u64, now: Instant) {
        #[allow(clippy::cast_precision_loss)] // byte counts are far below 2^52
        let bytes = bytes as f64;
        self.credit = self.credit(now) - bytes;
        self.at = now;
    }

    /// How long from `now` until an update of one element fits.
    #[must_use]
    pub fn wait(&self, now: Instant, coding: ValueCoding) -> Duration {
        #[allow(clippy::cast_precision_loss)] // a constant
        let needed = CALL_BYTES as f64 + element_bytes(coding) - self.credit(now);
        if needed <= 0.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(needed / self.rate)
    }

    /// How many elements an update formed at `now` may hold: what the
    /// credit pays for beyond one call's framing.
    #[must_use]
    pub fn elements(&self, now: Instant, coding: ValueCoding) -> usize {
        #[allow(clippy::cast_precision_loss)] // a constant
        let room = self.credit(now) - CALL_BYTES as f64;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // floor of a positive
        if room > 0.0 {
            (room / element_bytes(coding)) as usize
        } else {
            0
        }
    }
}

/// Bytes one element adds to an update in `coding`, on average.
fn element_bytes(coding: ValueCoding) -> f64 {
    #[allow(clippy::cast_precision_loss)] // one to four
    let value = coding.bytes_per_value() as f64;
    INDEX_BYTES + value
}

/// Of `ranked` (significance, element) pairs, the elements to hold back so
/// that the `room` most significant go: the rest, in index order. Ties go
/// either way.
#[must_use]
pub fn held_back(mut ranked: Vec<(f64, u32)>, room: usize) -> Vec<u32> {
    if room >= ranked.len() {
        return Vec::new();
    }
    if room > 0 {
        ranked.select_nth_unstable_by(room - 1, |a, b| b.0.total_cmp(&a.0));
    }
    let mut held: Vec<u32> = ranked[room..].iter().map(|&(_, i)| i).collect();
    held.sort_unstable();
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::float_cmp)] // exact binary fractions
    fn the_allowance_fills_at_the_budget_up_to_half_a_second_and_can_be_owed() {
        let t0 = Instant::now();
        let mut a = Allowance::new(1000.0, t0);
        assert_eq!(a.credit(t0), 500.0);
        // Saved up to half a second, no more.
        assert_eq!(a.credit(t0 + Duration::from_secs(10)), 500.0);
        a.spend(800, t0);
        assert_eq!(a.credit(t0), -300.0);
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(a.credit(t1), -50.0);
        // 64 bytes of framing and 6 of a Float32 element: 120 bytes short.
        assert_eq!(a.wait(t1, ValueCoding::Float32), Duration::from_millis(120));
        assert_eq!(a.elements(t1, ValueCoding::Float32), 0);
        let t2 = t0 + Duration::from_millis(500);
        assert_eq!(a.credit(t2), 200.0);
        assert_eq!(a.wait(t2, ValueCoding::Float32), Duration::ZERO);
        // (200 - 64) / 6 Float32 elements, / 3 Int8 ones.
        assert_eq!(a.elements(t2, ValueCoding::Float32), 22);
        assert_eq!(a.elements(t2, ValueCoding::Int8), 45);
        // A new budget keeps what is owed or saved.
        a.set_rate(2000.0, t2);
        assert_eq!(a.credit(t2 + Duration::from_millis(100)), 400.0);
    }

    #[test]
    fn the_most_significant_go_and_the_rest_is_held_in_index_order() {
        let ranked = vec![(0.5, 7), (f64::INFINITY, 3), (0.1, 1), (0.9, 4), (0.2, 9)];
        assert_eq!(held_back(ranked.clone(), 2), vec![1, 7, 9]);
        assert_eq!(held_back(ranked.clone(), 0), vec![1, 3, 4, 7, 9]);
        assert!(held_back(ranked.clone(), 5).is_empty());
        assert!(held_back(ranked, 50).is_empty());
    }
}
