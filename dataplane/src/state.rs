//! The lock-protected state of a shard server — its rows, durability,
//! progress and mirror synchronisation — that the parameter-server service
//! (`ps::service`) and Gaia's mirror service (`gaia::service`) both hold;
//! neither service imports the other for it.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use prost::Message;

use crate::gaia::state::{MirrorError, MirrorState};
use crate::pb;
use crate::pb::mirror::MirrorLogRecord;
use crate::ps::durability::Durability;
use crate::ps::shard::Shard;

/// What waiting readers watch: the slowest worker's clock, whether training
/// stopped, and what the mirrors allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Lowest clock over all workers.
    pub min_clock: u64,
    /// Training has stopped.
    pub stopped: bool,
    /// Highest clock at which workers may read (mirror-clock bound or
    /// averaging round); `u64::MAX` without mirrors.
    pub read_limit: u64,
    /// Changes whenever the selective barrier releases rows.
    pub epoch: u64,
}

impl Progress {
    fn of(state: &State) -> Self {
        Self {
            min_clock: state.shard.min_clock(),
            stopped: state.stopped.is_some(),
            read_limit: state
                .mirror
                .as_ref()
                .map_or(u64::MAX, MirrorState::read_limit),
            epoch: state.mirror.as_ref().map_or(0, MirrorState::epoch),
        }
    }
}

/// Wakes readers waiting on `progress` if `state` lets them go further.
pub fn publish(state: &State, progress: &watch::Sender<Progress>) {
    let now = Progress::of(state);
    progress.send_if_modified(|p| {
        let changed = *p != now;
        *p = now;
        changed
    });
}

/// Mutable state of a shard server, behind one lock.
pub struct State {
    /// The rows.
    pub shard: Shard,
    /// Checkpoints and the write-ahead log, when enabled.
    pub durability: Option<Durability>,
    /// Why training stopped, once it has.
    pub stopped: Option<String>,
    /// Reports received (shard 0).
    pub history: Vec<pb::MetricPoint>,
    /// Request bytes received.
    pub bytes_received: u64,
    /// Response bytes sent.
    pub bytes_sent: u64,
    /// Request and response bytes exchanged with workers of other datacenters.
    pub wan_bytes: u64,
    /// Per worker, whether it said it left (stopped and sends nothing more).
    pub left: Vec<bool>,
    /// This shard's datacenter.
    pub datacenter: String,
    /// Synchronisation with the mirrors in other datacenters, if any.
    pub mirror: Option<MirrorState>,
}

impl State {
    /// Whether this shard's own part of training is over: training stopped,
    /// every worker left, and (with mirrors) everything generated here
    /// reached every peer.
    #[must_use]
    pub fn finished(&self) -> bool {
        self.stopped.is_some()
            && self.left.iter().all(|&l| l)
            && self.mirror.as_ref().is_none_or(MirrorState::drained)
    }

    /// Appends a change of mirror state to the write-ahead log (when there
    /// is one), then carries it out.
    pub fn mirror_step(&mut self, record: &MirrorLogRecord) -> Result<(), MirrorError> {
        if let Some(durability) = &mut self.durability {
            durability.log(&pb::WalRecord {
                record: Some(pb::wal_record::Record::Mirror(record.encode_to_vec())),
            })?;
        }
        match &mut self.mirror {
            Some(mirror) => mirror.apply(record, &mut self.shard),
            None => Ok(()),
        }
    }

    /// Writes a checkpoint now, if checkpoints are enabled.
    pub fn checkpoint(&mut self) -> std::io::Result<()> {
        let min_clock = self.shard.min_clock();
        let mut checkpoint = self.shard.checkpoint();
        checkpoint.stopped = self.stopped.is_some();
        checkpoint.stop_reason = self.stopped.clone().unwrap_or_default();
        checkpoint.mirror = self
            .mirror
            .as_ref()
            .map(|m| m.checkpoint().encode_to_vec())
            .unwrap_or_default();
        match &mut self.durability {
            Some(d) => d.checkpoint(&checkpoint, min_clock),
            None => Ok(()),
        }
    }
}

/// Locks a shard's state.
pub fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the shard half-updated:
    // `Shard::apply` validates before it mutates. Keep serving.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
