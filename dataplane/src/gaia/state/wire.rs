//! The wire edge of [`MirrorState`]: mirror messages decoded into indexes
//! and deltas before the state sees them, and the updates it sends packed.

use geoml_proto::rows::{pack_indexes, pack_values, unpack_indexes, unpack_values};

use super::{MirrorError, MirrorState, PeerUpdate};
use crate::pb;
use crate::pb::mirror::{Announcement, MirrorUpdate};
use crate::ps::shard::Shard;

impl MirrorState {
    /// A peer announces the elements of its update `seq`.
    pub fn on_announce(
        &mut self,
        announce: &Announcement,
        shard: &Shard,
    ) -> Result<(), MirrorError> {
        let p = self.peer(&announce.datacenter)?;
        let indexes = unpack_indexes(&announce.indexes)?;
        self.announced(p, announce.seq, &indexes, shard)
    }

    /// A peer's update: applied to `shard` at most once. Returns whether it
    /// was new.
    pub fn on_update(
        &mut self,
        update: &MirrorUpdate,
        shard: &mut Shard,
    ) -> Result<bool, MirrorError> {
        let p = self.peer(&update.datacenter)?;
        if self.peers[p].applied.contains(&update.seq) {
            return Ok(false);
        }
        let decoded = PeerUpdate {
            seq: update.seq,
            indexes: unpack_indexes(&update.indexes)?,
            deltas: unpack_values(&update.deltas)?,
            announced: update.announced,
            round: update.round,
        };
        self.apply_update(p, &decoded, shard)
    }

    /// The next update, of `deltas` at `indexes`.
    pub(super) fn update(&mut self, indexes: &[u32], deltas: &[f32]) -> MirrorUpdate {
        self.stats.elements_sent += indexes.len() as u64;
        self.seq += 1;
        MirrorUpdate {
            datacenter: self.config.datacenter.clone(),
            seq: self.seq,
            indexes: pack_indexes(indexes),
            deltas: pack_values(deltas),
            announced: false,
            round: 0,
        }
    }

    /// The state for the shard's status.
    #[must_use]
    pub fn status(&self, unacknowledged: u64) -> pb::MirrorStatus {
        pb::MirrorStatus {
            elements_updated: self.changes.count,
            elements_sent: self.stats.elements_sent,
            updates_sent: self.stats.updates_sent,
            bytes_sent: self.stats.bytes_sent,
            barrier_blocks: self.stats.barrier_blocks,
            barrier_wait_seconds: self.stats.barrier_wait,
            clock_blocks: self.stats.clock_blocks,
            clock_wait_seconds: self.stats.clock_wait,
            threshold: self.threshold(),
            mirror_clock: self.mirror_clock,
            max_skew: self.stats.max_skew,
            drained: self.drained(unacknowledged),
            peers: self
                .peers
                .iter()
                .map(|p| pb::PeerStatus {
                    datacenter: p.name.clone(),
                    mirror_clock: p.mirror_clock,
                    stopped: p.stopped,
                    drained: p.drained,
                    rtt_seconds: p.rtt.map_or(0.0, |r| r.as_secs_f64()),
                    throughput_bytes_per_second: p.throughput.unwrap_or(0.0),
                    sent_bytes: p.sent_bytes,
                    delivered_bytes: p.delivered_bytes,
                })
                .collect(),
        }
    }
}
