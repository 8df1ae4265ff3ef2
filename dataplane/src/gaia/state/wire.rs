//! The wire edge of [`MirrorState`]: mirror messages decoded into indexes
//! and deltas before the state sees them, and the updates it sends packed,
//! their values in the SyncPolicy's coding.

use std::time::Instant;

use geoml_crds::sync_policy::ValueCoding;
use geoml_proto::rows::{
    RowsError, from_bf16, from_int8, int8_scale, pack_bf16, pack_bitmap, pack_indexes, pack_values,
    to_bf16, to_int8, unpack_bf16, unpack_bitmap, unpack_indexes, unpack_int8, unpack_values,
};

use super::{MirrorError, MirrorState, PeerUpdate};
use crate::pb;
use crate::pb::mirror::mirror_log_record::Record;
use crate::pb::mirror::{Announcement, MirrorLogRecord, MirrorUpdate};
use crate::ps::shard::Shard;

/// An update of `deltas` at `indexes`, not yet addressed or numbered.
pub(super) fn update_message(indexes: &[u32], deltas: &[f32]) -> MirrorUpdate {
    let mut update = MirrorUpdate {
        datacenter: String::new(),
        seq: 0,
        indexes: pack_indexes(indexes),
        deltas: pack_values(deltas),
        announced: false,
        round: 0,
        epoch: 0,
        coding: pb::mirror::ValueCoding::Float32.into(),
        scale: 0.0,
        index_bitmap: Vec::new(),
        remainder: false,
    };
    let bitmap = pack_bitmap(indexes);
    if bitmap.len() < update.indexes.len() {
        update.indexes = Vec::new();
        update.index_bitmap = bitmap;
    }
    update
}

/// The indexes of `update`, from whichever of its two forms it carries
/// them in, for a shard of `elements` elements.
pub(super) fn indexes(update: &MirrorUpdate, elements: usize) -> Result<Vec<u32>, MirrorError> {
    if update.index_bitmap.is_empty() {
        Ok(unpack_indexes(&update.indexes)?)
    } else if update.indexes.is_empty() {
        Ok(unpack_bitmap(&update.index_bitmap, elements)?)
    } else {
        Err(RowsError::IndexForms.into())
    }
}

/// An update of `deltas` at `indexes` with its values in `coding`, and
/// what the coding rounded off, per index (non-zero only), for the sender
/// to keep and send later. A delta the coding rounds to 0 is left out of
/// the update and kept whole.
pub(super) fn coded_update(
    indexes: &[u32],
    deltas: &[f32],
    coding: ValueCoding,
) -> (MirrorUpdate, Vec<(u32, f32)>) {
    let (wire, scale) = match coding {
        ValueCoding::Float32 => return (update_message(indexes, deltas), Vec::new()),
        ValueCoding::BFloat16 => (pb::mirror::ValueCoding::Bfloat16, 0.0),
        ValueCoding::Int8 => (pb::mirror::ValueCoding::Int8, int8_scale(deltas)),
    };
    let code = |d: f32| match coding {
        ValueCoding::Int8 => from_int8(to_int8(d, scale), scale),
        ValueCoding::BFloat16 | ValueCoding::Float32 => from_bf16(to_bf16(d)),
    };
    let coded: Vec<f32> = deltas.iter().map(|&d| code(d)).collect();
    // Near f32::MAX a coding can round up to infinity, which a receiver
    // refuses: such an update goes exact.
    if coded.iter().any(|c| !c.is_finite()) {
        return (update_message(indexes, deltas), Vec::new());
    }
    let mut sent_indexes = Vec::with_capacity(indexes.len());
    let mut sent = Vec::with_capacity(deltas.len());
    let mut kept = Vec::new();
    for ((&i, &d), &c) in indexes.iter().zip(deltas).zip(&coded) {
        if c != 0.0 {
            sent_indexes.push(i);
            sent.push(c);
        }
        let rest = d - c;
        if rest != 0.0 {
            kept.push((i, rest));
        }
    }
    let mut update = update_message(&sent_indexes, &[]);
    update.deltas = match coding {
        ValueCoding::Int8 => geoml_proto::rows::pack_int8(&sent, scale),
        ValueCoding::BFloat16 | ValueCoding::Float32 => pack_bf16(&sent),
    };
    update.coding = wire.into();
    update.scale = scale;
    (update, kept)
}

/// The deltas of `update`, decoded from its coding.
pub(super) fn deltas(update: &MirrorUpdate) -> Result<Vec<f32>, MirrorError> {
    match pb::mirror::ValueCoding::try_from(update.coding) {
        Ok(pb::mirror::ValueCoding::Float32) => Ok(unpack_values(&update.deltas)?),
        Ok(pb::mirror::ValueCoding::Bfloat16) => Ok(unpack_bf16(&update.deltas)?),
        Ok(pb::mirror::ValueCoding::Int8) if update.scale.is_finite() => {
            Ok(unpack_int8(&update.deltas, update.scale))
        }
        _ => Err(MirrorError::Coding(update.coding)),
    }
}

fn decode(update: &MirrorUpdate, shard: &Shard) -> Result<PeerUpdate, MirrorError> {
    Ok(PeerUpdate {
        stamp: (update.epoch, update.seq),
        indexes: indexes(update, shard.values().len())?,
        deltas: deltas(update)?,
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
        let decoded = decode(update, shard)?;
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
                let decoded = decode(update, shard)?;
                if self.accept(p, &decoded, shard)? {
                    self.apply_update(p, &decoded, shard)?;
                }
                Ok(())
            }
            Some(Record::Queued(update)) => {
                let indexes = indexes(update, shard.values().len())?;
                let deltas = deltas(update)?;
                self.take(update, &indexes, &deltas, shard)
            }
            Some(Record::Formed(formed)) => self.formed(
                formed.peer as usize,
                (formed.epoch, formed.seq),
                formed.announced,
                formed.exact,
                &unpack_indexes(&formed.held)?,
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
