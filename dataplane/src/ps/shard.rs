//! One parameter-server shard: its rows, optimiser state, worker clocks and
//! consistency model. Pure state, no I/O; the gRPC service wraps it.

use geoml_crds::sync_policy::ConsistencyModel;
use geoml_crds::training_job::Optimizer;

use super::optimizer::OptimizerState;
use crate::model::Layout;
use crate::pb;
use bytes::Bytes;
use geoml_proto::rows::{Values, extend_values, pack_values, unpack_values};

/// When a worker may read: the consistency model inside a datacenter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Bulk synchronous: a worker at clock c reads once every worker reached c.
    Bsp,
    /// Stale synchronous: once every worker reached c − s.
    Ssp(u64),
    /// Asynchronous: always.
    Async,
}

impl Consistency {
    /// The consistency of a SyncPolicy's `intraDatacenter.model`, with its
    /// checked staleness.
    #[must_use]
    pub fn new(model: ConsistencyModel, staleness: u64) -> Self {
        match model {
            ConsistencyModel::Bsp => Self::Bsp,
            ConsistencyModel::Ssp => Self::Ssp(staleness),
            ConsistencyModel::Async => Self::Async,
        }
    }

    /// Whether a worker that completed `clock` iterations may read when the
    /// slowest worker completed `min_clock`.
    #[must_use]
    pub fn can_read(self, clock: u64, min_clock: u64) -> bool {
        match self {
            Self::Bsp => min_clock >= clock,
            Self::Ssp(s) => min_clock + s >= clock,
            Self::Async => true,
        }
    }
}

/// Why a request cannot be served; each maps to `InvalidArgument`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    /// The worker index is out of range.
    #[error("worker {worker} does not exist (the job has {workers} workers)")]
    UnknownWorker {
        /// The index sent.
        worker: u32,
        /// Number of workers.
        workers: usize,
    },
    /// A key is not one of this shard's rows.
    #[error(
        "key {key} is not a row of shard {shard} (keys k with k % {shards} == {shard}, below {rows})"
    )]
    NotOwned {
        /// The key.
        key: u32,
        /// This shard.
        shard: u32,
        /// Number of shards.
        shards: u32,
        /// Rows in the model.
        rows: usize,
    },
    /// The values do not match the rows' widths.
    #[error("expected {expected} values for the rows named, got {got}")]
    Shape {
        /// Floats the rows hold.
        expected: usize,
        /// Floats sent.
        got: usize,
    },
    /// A push skips clocks.
    #[error("worker {worker} pushed clock {got}, expected {expected}")]
    ClockJump {
        /// The worker.
        worker: u32,
        /// Next clock it should push.
        expected: u64,
        /// Clock it pushed.
        got: u64,
    },
    /// A gradient holds NaN or infinity.
    #[error("gradient value {index} is not finite")]
    NotFinite {
        /// Position of the value.
        index: usize,
    },
    /// An element index is past the shard's values.
    #[error("element {index} does not exist (the shard holds {elements})")]
    NoElement {
        /// The index sent.
        index: u32,
        /// Elements the shard holds.
        elements: usize,
    },
    /// A checkpoint does not fit this shard.
    #[error("checkpoint does not fit this shard: {0}")]
    Checkpoint(String),
}

/// The changes a datacenter's own workers made to a shard, element by
/// element: what Gaia's mirrors accumulate and send.
#[derive(Clone, Debug, PartialEq)]
pub struct Changes {
    /// Changes not yet sent to the mirrors.
    pub accumulated: Vec<f32>,
    /// Every change ever made, summed in f64, less the peers' shares of
    /// what was held back when training stopped: what this datacenter
    /// contributed to every model (for checking conservation).
    pub generated: Vec<f64>,
    /// Element changes made (non-zero ones).
    pub count: u64,
    /// Elements whose change or value moved since [`Self::drain_touched`],
    /// one bit each: only these can have become significant.
    touched: Vec<u64>,
}

impl Changes {
    /// No changes to a shard of `len` elements.
    #[must_use]
    pub fn new(len: usize) -> Self {
        Self {
            accumulated: vec![0.0; len],
            generated: vec![0.0; len],
            count: 0,
            touched: vec![u64::MAX; len.div_ceil(64)],
        }
    }

    /// Records the change of the elements from `start` on, `before` to
    /// `after`, and marks them (in one pass the compiler can vectorise).
    fn add(&mut self, start: usize, before: &[f32], after: &[f32]) {
        let end = start + before.len();
        let mut changed = 0;
        for (((acc, generated), old), new) in self.accumulated[start..end]
            .iter_mut()
            .zip(&mut self.generated[start..end])
            .zip(before)
            .zip(after)
        {
            let delta = new - old;
            *acc += delta;
            *generated += f64::from(delta);
            changed += u64::from(delta != 0.0);
        }
        self.count += changed;
        if changed > 0 {
            // Marking the unchanged elements among them too only has the
            // next check look at them again, and find what it found before.
            self.touch_range(start, end);
        }
    }

    /// Marks element `i` as moved (by a peer's update, say).
    pub fn touch(&mut self, i: usize) {
        self.touched[i / 64] |= 1 << (i % 64);
    }

    /// Marks the elements `start..end`, a word at a time.
    fn touch_range(&mut self, mut start: usize, end: usize) {
        while start < end {
            let bit = start % 64;
            let n = (64 - bit).min(end - start);
            self.touched[start / 64] |= (u64::MAX >> (64 - n)) << bit;
            start += n;
        }
    }

    /// Marks every element as moved: the next check looks at all of them.
    pub fn touch_all(&mut self) {
        self.touched.fill(u64::MAX);
    }

    /// Calls `f` with every element marked since the last call, ascending,
    /// and its accumulated change; clears the marks.
    pub fn drain_touched(&mut self, mut f: impl FnMut(usize, f32)) {
        let len = self.accumulated.len();
        for (w, word) in self.touched.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                if i < len {
                    f(i, self.accumulated[i]);
                }
                bits &= bits - 1;
            }
        }
    }
}

/// Whether a push changed the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied now.
    Fresh,
    /// Its clock was applied before (a retry); ignored.
    Duplicate,
}

/// A shard's rows and bookkeeping.
#[derive(Clone, Debug)]
pub struct Shard {
    id: u32,
    shards: u32,
    model_rows: usize,
    /// Owned keys ascending: `shard, shard + shards, ...`.
    keys: Vec<u32>,
    /// Local start of every owned row, plus the total length.
    starts: Vec<usize>,
    values: Vec<f32>,
    optimizer_kind: Optimizer,
    optimizer: OptimizerState,
    learning_rate: f32,
    worker_clocks: Vec<u64>,
    updates_applied: u64,
}

impl Shard {
    /// Shard `shard` of `shards` over `layout`, rows initialised by `init`.
    pub fn new(
        layout: &Layout,
        shard: u32,
        shards: u32,
        workers: usize,
        optimizer: Optimizer,
        learning_rate: f32,
        mut init: impl FnMut(u32, &mut [f32]),
    ) -> Self {
        let model_rows = layout.num_rows();
        let keys: Vec<u32> = (0..u32::try_from(model_rows).unwrap_or(u32::MAX))
            .filter(|k| k % shards == shard)
            .collect();
        let mut starts = Vec::with_capacity(keys.len() + 1);
        let mut values = Vec::new();
        for &key in &keys {
            starts.push(values.len());
            let width = layout.row(key).map_or(0, |r| r.len());
            let at = values.len();
            values.resize(at + width, 0.0);
            init(key, &mut values[at..]);
        }
        starts.push(values.len());
        let optimizer_state = OptimizerState::new(optimizer, values.len(), keys.len());
        Self {
            id: shard,
            shards,
            model_rows,
            keys,
            starts,
            values,
            optimizer_kind: optimizer,
            optimizer: optimizer_state,
            learning_rate,
            worker_clocks: vec![0; workers],
            updates_applied: 0,
        }
    }

    /// Index of this shard.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Keys this shard owns, ascending.
    #[must_use]
    pub fn keys(&self) -> &[u32] {
        &self.keys
    }

    /// Lowest clock over all workers.
    #[must_use]
    pub fn min_clock(&self) -> u64 {
        self.worker_clocks.iter().copied().min().unwrap_or(0)
    }

    /// Clock of every worker.
    #[must_use]
    pub fn worker_clocks(&self) -> &[u64] {
        &self.worker_clocks
    }

    /// Pushes applied so far.
    #[must_use]
    pub fn updates_applied(&self) -> u64 {
        self.updates_applied
    }

    /// Every float of the shard, rows in key order.
    #[must_use]
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    fn local(&self, key: u32) -> Result<usize, ShardError> {
        if key % self.shards == self.id && (key as usize) < self.model_rows {
            Ok((key / self.shards) as usize)
        } else {
            Err(ShardError::NotOwned {
                key,
                shard: self.id,
                shards: self.shards,
                rows: self.model_rows,
            })
        }
    }

    /// Checks that `worker` exists.
    pub fn check_worker(&self, worker: u32) -> Result<(), ShardError> {
        if (worker as usize) < self.worker_clocks.len() {
            Ok(())
        } else {
            Err(ShardError::UnknownWorker {
                worker,
                workers: self.worker_clocks.len(),
            })
        }
    }

    /// The values of `keys` (`None`: every row), concatenated in key order.
    pub fn read(&self, keys: Option<&[u32]>) -> Result<Vec<f32>, ShardError> {
        let Some(keys) = keys else {
            return Ok(self.values.clone());
        };
        let mut out = Vec::new();
        for &key in keys {
            let i = self.local(key)?;
            out.extend_from_slice(&self.values[self.starts[i]..self.starts[i + 1]]);
        }
        Ok(out)
    }

    /// The values of `keys` (`None`: every row) packed for the wire, copied
    /// once from the rows.
    pub fn read_bytes(&self, keys: Option<&[u32]>) -> Result<Bytes, ShardError> {
        let Some(keys) = keys else {
            let mut out = Vec::with_capacity(4 * self.values.len());
            extend_values(&mut out, &self.values);
            return Ok(out.into());
        };
        // Room for rows of average width: no regrowth when widths are equal.
        let average = self.values.len() / self.keys.len().max(1);
        let mut out = Vec::with_capacity(4 * average * keys.len());
        for &key in keys {
            let i = self.local(key)?;
            extend_values(&mut out, &self.values[self.starts[i]..self.starts[i + 1]]);
        }
        Ok(out.into())
    }

    /// Applies `gradient` for `keys` (`None`: every row) as `worker`'s
    /// iteration `clock`. Validates everything before changing anything.
    pub fn apply(
        &mut self,
        worker: u32,
        clock: u64,
        keys: Option<&[u32]>,
        gradient: &[f32],
    ) -> Result<Applied, ShardError> {
        let gradient = Values::of(gradient);
        match self.check(worker, clock, keys, gradient)? {
            Some(rows) => {
                self.commit(worker, clock, &rows, gradient, None);
                Ok(Applied::Fresh)
            }
            None => Ok(Applied::Duplicate),
        }
    }

    /// Validates a push without changing anything: the local rows it
    /// touches, or `None` when its clock was applied before (a retry).
    /// `gradient` is read where it lies (the received buffer).
    pub fn check(
        &self,
        worker: u32,
        clock: u64,
        keys: Option<&[u32]>,
        gradient: Values<'_>,
    ) -> Result<Option<Vec<usize>>, ShardError> {
        self.check_worker(worker)?;
        let current = self.worker_clocks[worker as usize];
        if clock <= current {
            return Ok(None);
        }
        if clock != current + 1 {
            return Err(ShardError::ClockJump {
                worker,
                expected: current + 1,
                got: clock,
            });
        }
        let rows = self.rows_of(keys)?;
        let expected: usize = rows
            .iter()
            .map(|&i| self.starts[i + 1] - self.starts[i])
            .sum();
        if expected != gradient.len() {
            return Err(ShardError::Shape {
                expected,
                got: gradient.len(),
            });
        }
        if let Some(index) = gradient.first_non_finite() {
            return Err(ShardError::NotFinite { index });
        }
        Ok(Some(rows))
    }

    /// Applies a push that [`Self::check`] accepted, with the rows it
    /// returned, adding the changes it makes to `changes` when given.
    pub fn commit(
        &mut self,
        worker: u32,
        clock: u64,
        rows: &[usize],
        gradient: Values<'_>,
        mut changes: Option<&mut Changes>,
    ) {
        // Wire bytes are rarely 4-aligned: a row is then copied into a
        // small buffer that stays in cache, never the whole gradient.
        let aligned = gradient.aligned();
        let mut row = Vec::new();
        let mut at = 0;
        let mut before = Vec::new();
        for &i in rows {
            let (start, end) = (self.starts[i], self.starts[i + 1]);
            let width = end - start;
            if changes.is_some() {
                before.clear();
                before.extend_from_slice(&self.values[start..end]);
            }
            let g: &[f32] = if let Some(aligned) = aligned {
                &aligned[at..at + width]
            } else {
                // `check` matched the gradient's length to the rows.
                row.clear();
                row.resize(width, 0.0);
                if let Some(packed) = gradient.get(at..at + width) {
                    packed.copy_to(&mut row);
                }
                &row
            };
            self.optimizer.step(
                self.learning_rate,
                i,
                start,
                &mut self.values[start..end],
                g,
            );
            if let Some(changes) = changes.as_deref_mut() {
                changes.add(start, &before, &self.values[start..end]);
            }
            at += width;
        }
        self.worker_clocks[worker as usize] = clock;
        self.updates_applied += 1;
    }

    /// Adds `deltas` to the elements at `indexes` (positions in
    /// [`Self::values`]): updates made by another datacenter's workers.
    /// Checks everything before changing anything.
    pub fn add(&mut self, indexes: &[u32], deltas: &[f32]) -> Result<(), ShardError> {
        self.check_add(indexes, deltas)?;
        for (&i, &d) in indexes.iter().zip(deltas) {
            self.values[i as usize] += d;
        }
        Ok(())
    }

    /// Checks what [`Self::add`] would check, changing nothing.
    pub fn check_add(&self, indexes: &[u32], deltas: &[f32]) -> Result<(), ShardError> {
        if indexes.len() != deltas.len() {
            return Err(ShardError::Shape {
                expected: indexes.len(),
                got: deltas.len(),
            });
        }
        if let Some(&index) = indexes.iter().find(|&&i| i as usize >= self.values.len()) {
            return Err(ShardError::NoElement {
                index,
                elements: self.values.len(),
            });
        }
        if let Some(index) = deltas.iter().position(|d| !d.is_finite()) {
            return Err(ShardError::NotFinite { index });
        }
        Ok(())
    }

    /// The local row holding element `index` of [`Self::values`].
    #[must_use]
    pub fn row_of(&self, index: u32) -> usize {
        self.starts.partition_point(|&s| s <= index as usize) - 1
    }

    /// The local rows of `keys` (`None`: every row).
    pub fn rows_of(&self, keys: Option<&[u32]>) -> Result<Vec<usize>, ShardError> {
        match keys {
            None => Ok((0..self.keys.len()).collect()),
            Some(keys) => keys.iter().map(|&k| self.local(k)).collect(),
        }
    }

    /// Number of rows this shard owns.
    #[must_use]
    pub fn num_rows(&self) -> usize {
        self.keys.len()
    }

    /// The shard's state for a checkpoint.
    #[must_use]
    pub fn checkpoint(&self) -> pb::Checkpoint {
        pb::Checkpoint {
            shard: self.id,
            shards: self.shards,
            worker_clocks: self.worker_clocks.clone(),
            values: pack_values(&self.values),
            optimizer_state: self.optimizer.to_bytes(),
            updates_applied: self.updates_applied,
            stopped: false,
            stop_reason: String::new(),
            mirror: Vec::new(),
        }
    }

    /// Replaces the state with a checkpoint of the same shard.
    pub fn restore(&mut self, checkpoint: &pb::Checkpoint) -> Result<(), ShardError> {
        let misfit = |what: &str| ShardError::Checkpoint(what.to_owned());
        if checkpoint.shard != self.id || checkpoint.shards != self.shards {
            return Err(misfit("it belongs to another shard"));
        }
        if checkpoint.worker_clocks.len() != self.worker_clocks.len() {
            return Err(misfit("it has another number of workers"));
        }
        let values = unpack_values(&checkpoint.values)
            .ok()
            .filter(|v| v.len() == self.values.len())
            .ok_or_else(|| misfit("its rows have another shape"))?;
        let optimizer = OptimizerState::from_bytes(
            self.optimizer_kind,
            self.values.len(),
            self.keys.len(),
            &checkpoint.optimizer_state,
        )
        .ok_or_else(|| misfit("its optimiser state has another shape"))?;
        self.values = values;
        self.optimizer = optimizer;
        self.worker_clocks.clone_from(&checkpoint.worker_clocks);
        self.updates_applied = checkpoint.updates_applied;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the values compared are exact
mod tests {
    use super::*;
    use crate::model::TensorShape;

    fn layout() -> Layout {
        Layout::new(vec![
            TensorShape {
                name: "w",
                rows: 4,
                cols: 2,
            },
            TensorShape {
                name: "b",
                rows: 1,
                cols: 3,
            },
        ])
    }

    fn shard(shard: u32) -> Shard {
        Shard::new(&layout(), shard, 2, 2, Optimizer::Sgd, 1.0, |key, out| {
            out.fill(f32::from(u16::try_from(key).unwrap()));
        })
    }

    #[test]
    fn owns_every_other_row() {
        assert_eq!(shard(0).keys(), [0, 2, 4]);
        assert_eq!(shard(1).keys(), [1, 3]);
        assert_eq!(shard(0).values(), [0.0, 0.0, 2.0, 2.0, 4.0, 4.0, 4.0]);
        assert_eq!(shard(0).read(Some(&[4])).unwrap(), [4.0, 4.0, 4.0]);
        let packed = shard(0).read_bytes(Some(&[4, 0])).unwrap();
        assert_eq!(unpack_values(&packed).unwrap(), [4.0, 4.0, 4.0, 0.0, 0.0]);
        let packed = shard(0).read_bytes(None).unwrap();
        assert_eq!(unpack_values(&packed).unwrap(), shard(0).values());
        assert!(matches!(
            shard(0).read_bytes(Some(&[1])),
            Err(ShardError::NotOwned { key: 1, .. })
        ));
        assert!(matches!(
            shard(0).read(Some(&[1])),
            Err(ShardError::NotOwned { key: 1, .. })
        ));
        assert!(matches!(
            shard(0).read(Some(&[9])),
            Err(ShardError::NotOwned { key: 9, .. })
        ));
    }

    #[test]
    fn applies_dense_and_sparse_updates_once() {
        let mut s = shard(0);
        assert_eq!(s.apply(0, 1, None, &[1.0; 7]).unwrap(), Applied::Fresh);
        assert_eq!(s.values(), [-1.0, -1.0, 1.0, 1.0, 3.0, 3.0, 3.0]);
        assert_eq!(
            s.apply(0, 2, Some(&[2]), &[1.0, 2.0]).unwrap(),
            Applied::Fresh
        );
        assert_eq!(s.read(Some(&[2])).unwrap(), [0.0, -1.0]);
        // A retry of an applied clock changes nothing.
        assert_eq!(
            s.apply(0, 2, Some(&[2]), &[1.0, 2.0]).unwrap(),
            Applied::Duplicate
        );
        assert_eq!(s.read(Some(&[2])).unwrap(), [0.0, -1.0]);
        assert_eq!(s.worker_clocks(), [2, 0]);
        assert_eq!(s.min_clock(), 0);
    }

    #[test]
    fn rejects_bad_pushes_without_changing_anything() {
        let mut s = shard(0);
        let before = s.values().to_vec();
        assert!(matches!(
            s.apply(5, 1, None, &[0.0; 7]),
            Err(ShardError::UnknownWorker { .. })
        ));
        assert!(matches!(
            s.apply(0, 1, None, &[0.0; 6]),
            Err(ShardError::Shape {
                expected: 7,
                got: 6
            })
        ));
        assert!(matches!(
            s.apply(0, 1, Some(&[0, 1]), &[0.0; 4]),
            Err(ShardError::NotOwned { key: 1, .. })
        ));
        assert!(matches!(
            s.apply(0, 3, None, &[0.0; 7]),
            Err(ShardError::ClockJump {
                expected: 1,
                got: 3,
                ..
            })
        ));
        let mut nan = [0.0; 7];
        nan[5] = f32::NAN;
        assert!(matches!(
            s.apply(0, 1, None, &nan),
            Err(ShardError::NotFinite { index: 5 })
        ));
        assert_eq!(s.values(), before);
        assert_eq!(s.worker_clocks(), [0, 0]);
    }

    #[test]
    fn tracks_changes_and_adds_remote_deltas() {
        let mut s = shard(0);
        let mut changes = Changes::new(s.values().len());
        let gradient = Values::of(&[1.0, 0.0]);
        let rows = s.check(0, 1, Some(&[2]), gradient).unwrap().unwrap();
        s.commit(0, 1, &rows, gradient, Some(&mut changes));
        assert_eq!(changes.accumulated, [0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(changes.count, 1);
        s.add(&[0, 6], &[0.5, -0.5]).unwrap();
        assert_eq!(s.values(), [0.5, 0.0, 1.0, 2.0, 4.0, 4.0, 3.5]);
        assert!(matches!(
            s.add(&[7], &[1.0]),
            Err(ShardError::NoElement { index: 7, .. })
        ));
        assert!(s.add(&[0], &[f32::NAN]).is_err());
        assert_eq!(
            (s.row_of(0), s.row_of(1), s.row_of(2), s.row_of(6)),
            (0, 0, 1, 2)
        );
    }

    #[test]
    fn marks_the_changed_rows_across_words_and_drains_them_once() {
        let mut changes = Changes::new(200);
        let touched = |changes: &mut Changes| {
            let mut seen = Vec::new();
            changes.drain_touched(|i, acc| seen.push((i, acc)));
            seen
        };
        assert_eq!(touched(&mut changes).len(), 200, "new: every element");
        assert!(touched(&mut changes).is_empty(), "drained");
        // A row from 60 to 130 (across two word boundaries), one element
        // unchanged: all of it is marked, nothing else.
        let before = vec![1.0; 70];
        let mut after = vec![1.5; 70];
        after[10] = 1.0;
        changes.add(60, &before, &after);
        let seen = touched(&mut changes);
        assert_eq!(
            seen.iter().map(|&(i, _)| i).collect::<Vec<_>>(),
            (60..130).collect::<Vec<_>>()
        );
        assert_eq!((seen[0].1, seen[10].1), (0.5, 0.0));
        assert_eq!(changes.count, 69);
        // A row that did not change marks nothing.
        changes.add(0, &[2.0; 64], &[2.0; 64]);
        assert!(touched(&mut changes).is_empty());
        changes.add(192, &[0.0; 8], &[1.0; 8]);
        assert_eq!(touched(&mut changes).len(), 8, "the last, partial word");
    }

    #[test]
    fn consistency_models_gate_reads() {
        assert!(Consistency::Bsp.can_read(3, 3));
        assert!(!Consistency::Bsp.can_read(4, 3));
        assert!(Consistency::Ssp(2).can_read(5, 3));
        assert!(!Consistency::Ssp(2).can_read(6, 3));
        assert!(Consistency::Async.can_read(100, 0));
    }

    #[test]
    fn checkpoint_restores_the_same_state() {
        let mut s = shard(1);
        s.apply(1, 1, Some(&[3]), &[0.5, 0.5]).unwrap();
        let mut fresh = shard(1);
        fresh.restore(&s.checkpoint()).unwrap();
        assert_eq!(fresh.values(), s.values());
        assert_eq!(fresh.worker_clocks(), s.worker_clocks());
        assert!(shard(0).restore(&s.checkpoint()).is_err());
    }
}
