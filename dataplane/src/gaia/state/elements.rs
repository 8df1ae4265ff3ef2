//! Deltas per element of a shard, for a link's queue and what its coding
//! carried: dense values and a bit per element, so that adding to an
//! element is an index, not a tree search, and the elements come out in
//! ascending order, as index coding wants them.

use std::fmt;

/// A delta for some of a shard's elements, ascending by element. Elements
/// without one hold 0.0.
#[derive(Clone, Default)]
pub(super) struct ElementDeltas {
    values: Vec<f32>,
    present: Vec<u64>,
    len: usize,
}

impl ElementDeltas {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn get(&self, i: u32) -> Option<f32> {
        self.contains(i).then(|| self.values[i as usize])
    }

    /// Adds `delta` to element `i`'s, which is 0.0 if it had none.
    pub(super) fn add(&mut self, i: u32, delta: f32) {
        self.mark(i);
        self.values[i as usize] += delta;
    }

    /// Element `i`'s delta becomes `delta`.
    pub(super) fn insert(&mut self, i: u32, delta: f32) {
        self.mark(i);
        self.values[i as usize] = delta;
    }

    pub(super) fn remove(&mut self, i: u32) -> Option<f32> {
        if !self.contains(i) {
            return None;
        }
        self.present[i as usize / 64] &= !(1 << (i % 64));
        self.len -= 1;
        Some(std::mem::take(&mut self.values[i as usize]))
    }

    /// The elements and their deltas, ascending.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        (0_u32..).zip(&self.present).flat_map(move |(word, &bits)| {
            let mut bits = bits;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let i = word * 64 + bits.trailing_zeros();
                    bits &= bits - 1;
                    (i, self.values[i as usize])
                })
            })
        })
    }

    /// Every element and its delta, ascending, leaving none (and the room
    /// for the next ones).
    pub(super) fn drain(&mut self) -> (Vec<u32>, Vec<f32>) {
        let pairs: (Vec<u32>, Vec<f32>) = self.iter().unzip();
        for &i in &pairs.0 {
            self.values[i as usize] = 0.0;
        }
        self.present.fill(0);
        self.len = 0;
        pairs
    }

    fn contains(&self, i: u32) -> bool {
        self.present
            .get(i as usize / 64)
            .is_some_and(|bits| bits & (1 << (i % 64)) != 0)
    }

    fn mark(&mut self, i: u32) {
        let at = i as usize;
        if self.values.len() <= at {
            self.values.resize(at + 1, 0.0);
            self.present.resize(at / 64 + 1, 0);
        }
        let bits = &mut self.present[at / 64];
        if *bits & (1 << (i % 64)) == 0 {
            *bits |= 1 << (i % 64);
            self.len += 1;
        }
    }
}

impl PartialEq for ElementDeltas {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for ElementDeltas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(u32, f32)> for ElementDeltas {
    fn from_iter<T: IntoIterator<Item = (u32, f32)>>(pairs: T) -> Self {
        let mut map = Self::default();
        for (i, delta) in pairs {
            map.insert(i, delta);
        }
        map
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // sums of exact binary fractions
mod tests {
    use super::*;

    #[test]
    fn adds_inserts_and_removes_like_a_sorted_map_and_drains_in_order() {
        let mut map = ElementDeltas::default();
        map.add(130, 0.5);
        map.add(3, 0.25);
        map.add(130, 0.25);
        map.insert(64, -1.0);
        map.add(63, 0.0);
        assert_eq!(map.len(), 4);
        assert_eq!(map.get(130), Some(0.75));
        assert_eq!(map.get(63), Some(0.0), "present with a delta of 0");
        assert_eq!(map.get(4), None);
        assert_eq!(map.get(100_000), None);
        assert_eq!(
            map.iter().collect::<Vec<_>>(),
            [(3, 0.25), (63, 0.0), (64, -1.0), (130, 0.75)]
        );
        assert_eq!(map.remove(64), Some(-1.0));
        assert_eq!(map.remove(64), None);
        map.add(64, 2.0);
        assert_eq!(
            map.get(64),
            Some(2.0),
            "a removed element starts again from 0"
        );
        let (indexes, deltas) = map.drain();
        assert_eq!(indexes, [3, 63, 64, 130]);
        assert_eq!(deltas, [0.25, 0.0, 2.0, 0.75]);
        assert!(map.is_empty());
        assert_eq!(map, ElementDeltas::default());
        map.add(130, 1.0);
        assert_eq!(map, [(130, 1.0)].into_iter().collect());
    }
}
