//! Drift detection on a site's error rate: the windowed limit of the Cartel
//! paper (error over the last W batches above L), and ADWIN as an option.

use std::collections::VecDeque;

/// Watches a stream of per-batch error rates and says when it has drifted
/// for the worse.
pub trait DriftDetector: Send {
    /// Adds one batch's error rate, in [0, 1]; true when drift is detected
    /// now. After a detection the detector starts afresh.
    fn observe(&mut self, error: f64) -> bool;
    /// Mean error over what the detector currently holds.
    fn mean(&self) -> f64;
}

/// Fires when the mean error over the last `window` batches exceeds
/// `limit` (and the window is full); then empties the window.
#[derive(Clone, Debug)]
pub struct WindowLimit {
    window: usize,
    limit: f64,
    errors: VecDeque<f64>,
    sum: f64,
}

impl WindowLimit {
    /// A detector with window W (at least 1 batch) and limit L.
    #[must_use]
    pub fn new(window: usize, limit: f64) -> Self {
        Self {
            window: window.max(1),
            limit,
            errors: VecDeque::new(),
            sum: 0.0,
        }
    }
}

impl DriftDetector for WindowLimit {
    fn observe(&mut self, error: f64) -> bool {
        self.errors.push_back(error);
        self.sum += error;
        if self.errors.len() > self.window {
            self.sum -= self.errors.pop_front().unwrap_or(0.0);
        }
        if self.errors.len() == self.window && self.mean() > self.limit {
            self.errors.clear();
            self.sum = 0.0;
            return true;
        }
        false
    }

    fn mean(&self) -> f64 {
        if self.errors.is_empty() {
            0.0
        } else {
            #[allow(clippy::cast_precision_loss)] // windows are small
            let n = self.errors.len() as f64;
            self.sum / n
        }
    }
}

/// ADWIN (Bifet and Gavaldà, 2007) on a bounded window: drops the older
/// part of the window when two sub-windows' means differ by more than the
/// Hoeffding-style bound `sqrt(ln(4n/δ) / (2m))` (m the harmonic mean of the
/// two sizes), and reports drift when the newer part is the worse one.
#[derive(Clone, Debug)]
pub struct Adwin {
    delta: f64,
    max_len: usize,
    min_side: usize,
    errors: VecDeque<f64>,
}

impl Adwin {
    /// ADWIN with confidence `delta` keeping at most `max_len` batches.
    #[must_use]
    pub fn new(delta: f64, max_len: usize) -> Self {
        Self {
            delta,
            max_len: max_len.max(8),
            min_side: 5,
            errors: VecDeque::new(),
        }
    }
}

impl DriftDetector for Adwin {
    #[allow(clippy::cast_precision_loss)] // window lengths are small
    fn observe(&mut self, error: f64) -> bool {
        self.errors.push_back(error);
        if self.errors.len() > self.max_len {
            self.errors.pop_front();
        }
        let n = self.errors.len();
        let total: f64 = self.errors.iter().sum();
        let mut head = 0.0;
        let mut cut = None;
        for (i, e) in self.errors.iter().enumerate() {
            head += e;
            let n0 = i + 1;
            let n1 = n - n0;
            if n0 < self.min_side || n1 < self.min_side {
                continue;
            }
            let (mean0, mean1) = (head / n0 as f64, (total - head) / n1 as f64);
            let m = 1.0 / (1.0 / n0 as f64 + 1.0 / n1 as f64);
            let bound = ((4.0 * n as f64 / self.delta).ln() / (2.0 * m)).sqrt();
            if (mean0 - mean1).abs() > bound {
                cut = Some((n0, mean1 > mean0));
            }
        }
        match cut {
            Some((n0, worse)) => {
                self.errors.drain(..n0);
                worse
            }
            None => false,
        }
    }

    #[allow(clippy::cast_precision_loss)] // window lengths are small
    fn mean(&self) -> f64 {
        if self.errors.is_empty() {
            0.0
        } else {
            self.errors.iter().sum::<f64>() / self.errors.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limit_needs_a_full_window() {
        let mut d = WindowLimit::new(3, 0.5);
        assert!(!d.observe(1.0));
        assert!(!d.observe(1.0));
        assert!(d.observe(1.0));
        // Afresh after firing.
        assert!(!d.observe(1.0));
    }
}
