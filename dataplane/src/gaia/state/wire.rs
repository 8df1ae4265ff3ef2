//! The wire edge of [`MirrorState`]: mirror messages decoded into indexes
//! and deltas before the state sees them, and the updates it sends packed.

use std::time::Instant;

use geoml_proto::rows::{pack_indexes, pack_values, unpack_indexes, unpack_values};

use super::{MirrorError, MirrorState, PeerUpdate};
use crate::pb;
use crate::pb::mirror::mirror_log_record::Record;
use crate::pb::mirror::{Announcement, MirrorLogRecord, MirrorUpdate};
use crate::ps::shard::Shard;

/// An update of `deltas` at `indexes`, not yet addressed or numbered.
pub(super) fn update_message(indexes: &[u32], deltas: &[f32]) -> MirrorUpdate {
    MirrorUpdate {
        datacenter: String::new(),
        seq: 0,
        indexes: pack_indexes(indexes),
        deltas: pack_values(deltas),
        announced: false,
        round: 0,
        epoch: 0,
    }
}

fn decode(update: &MirrorUpdate) -> Result<PeerUpdate, MirrorError> {
    Ok(PeerUpdate {
        stamp: (update.epoch, update.seq),
        indexes: unpack_indexes(&update.indexes)?,
        deltas: unpack_values(&update.deltas)?,
        announced: update.announced,
        round: update.round,
    })
}

impl MirrorState {
    /// A peer announces, at `now`, the elements of its update `seq`.
    pub fn on_announce(
        &mut self,
        announce: &Announcement,
        shard: &Shard,
        now: Instant,
    ) -> Result<(), MirrorError> {
        let p = self.peer(&announce.datacenter)?;
        let indexes = unpack_indexes(&announce.indexes)?;
        self.announced(p, (announce.epoch, announce.seq), &indexes, shard, now)
    }

    /// A peer's update, checked: the record to append to the write-ahead log
    /// and then [`Self::apply`], or `None` when it was applied before.
    pub fn accept_update(
        &self,
        update: &MirrorUpdate,
        shard: &Shard,
    ) -> Result<Option<MirrorLogRecord>, MirrorError> {
        let p = self.peer(&update.datacenter)?;
        let decoded = decode(update)?;
        Ok(self.accept(p, &decoded, shard)?.then(|| MirrorLogRecord {
            record: Some(Record::Applied(update.clone())),
        }))
    }

    /// A peer's update: applied to `shard` at most once (no log). Returns
    /// whether it was new.
    pub fn on_update(
        &mut self,
        update: &MirrorUpdate,
        shard: &mut Shard,
    ) -> Result<bool, MirrorError> {
        match self.accept_update(update, shard)? {
            Some(record) => self.apply(&record, shard).map(|()| true),
            None => Ok(false),
        }
    }

    /// Carries out a record of [`Self::on_clock`], [`Self::form`] or
    /// [`Self::accept_update`], live (after logging it) or replayed from
    /// the write-ahead log after a restart.
    pub fn apply(
        &mut self,
        record: &MirrorLogRecord,
        shard: &mut Shard,
    ) -> Result<(), MirrorError> {
        match &record.record {
            Some(Record::Applied(update)) => {
                let p = self.peer(&update.datacenter)?;
                let decoded = decode(update)?;
                if self.accept(p, &decoded, shard)? {
                    self.apply_update(p, &decoded, shard)?;
                }
                Ok(())
            }
            Some(Record::Queued(update)) => {
                let indexes = unpack_indexes(&update.indexes)?;
                let deltas = unpack_values(&update.deltas)?;
                self.take(update.seq, update.round, &indexes, &deltas)
            }
            Some(Record::Formed(formed)) => self.formed(
                formed.peer as usize,
                (formed.epoch, formed.seq),
                formed.announced,
            ),
            None => Err(MirrorError::Durable("an empty log record".into())),
        }
    }

    /// The state for the shard's status.
    #[must_use]
    pub fn status(&self) -> pb::MirrorStatus {
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
            drained: self.drained(),
            peers: self
                .peers
                .iter()
                .enumerate()
                .map(|(i, p)| pb::PeerStatus {
                    datacenter: p.name.clone(),
                    mirror_clock: p.mirror_clock,
                    stopped: p.stopped,
                    drained: p.drained,
                    rtt_seconds: p.rtt.map_or(0.0, |r| r.as_secs_f64()),
                    throughput_bytes_per_second: p.throughput.unwrap_or(0.0),
                    sent_bytes: p.sent_bytes,
                    delivered_bytes: p.delivered_bytes,
                    reachable: p.reachable,
                    epoch: p.epoch,
                    queued_elements: self.backlog_elements(i) as u64,
                    in_flight: p.outbox.in_flight.is_some(),
                })
                .collect(),
            peers_reachable: u32::try_from(self.peers_reachable()).unwrap_or(u32::MAX),
            epoch: self.sender_epoch,
        }
    }
}
