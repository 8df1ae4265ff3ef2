//! A small seeded random number generator whose output never changes.
//!
//! `rand`'s `StdRng` and `SliceRandom::shuffle` may change from one release
//! of `rand` to the next, which would silently change train/test splits and
//! partitions. Splits and partitions use [`SplitMix64`] and [`shuffle`]
//! instead, whose sequences are fixed: the generator is `rand_xoshiro`'s
//! SplitMix64 (Vigna's reference algorithm), and the 32-bit draws, byte
//! fills, bounded draws and the shuffle are defined here on its 64-bit
//! output alone.

use rand::{RngCore, SeedableRng};

/// Sebastiano Vigna's SplitMix64: 64 bits of state, passes BigCrush, and
/// every seed (including 0) is fine.
#[derive(Clone, Debug)]
pub struct SplitMix64(rand_xoshiro::SplitMix64);

impl SplitMix64 {
    /// A generator started from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(rand_xoshiro::SplitMix64::seed_from_u64(seed))
    }

    /// A uniformly distributed integer below `bound` (0 when `bound` is 0),
    /// by Lemire's multiply-and-reject method.
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(bound);
            // The low half decides rejection; the high half is the result.
            #[allow(clippy::cast_possible_truncation)]
            let low = product as u64;
            if low >= threshold {
                return (product >> 64) as u64;
            }
        }
    }
}

impl RngCore for SplitMix64 {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Shuffles `items` in place (Fisher–Yates), the same way for the same
/// generator state on every platform and every release.
pub fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        // `i + 1` fits in u64 and the result is at most `i`, so both casts are exact.
        #[allow(clippy::cast_possible_truncation)]
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference_values() {
        // First outputs for seed 1234567 of the reference C implementation.
        let mut rng = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            vec![
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423
            ]
        );
    }

    #[test]
    fn below_stays_below_and_covers_range() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let v = rng.below(5);
            assert!(v < 5);
            seen[usize::try_from(v).unwrap()] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        shuffle(&mut a, &mut SplitMix64::new(3));
        shuffle(&mut b, &mut SplitMix64::new(3));
        assert_eq!(a, b);
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn fill_bytes_handles_partial_chunks() {
        let mut buf = [0u8; 11];
        SplitMix64::new(1).fill_bytes(&mut buf);
        assert!(buf.iter().any(|&b| b != 0));
    }
}
