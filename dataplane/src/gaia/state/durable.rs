//! What of [`MirrorState`] a checkpoint keeps: the epoch, accumulated and
//! generated changes, the averaging rounds (the outer optimizer's momentum,
//! the round completed last, our open round and the peers' deltas received),
//! and per peer the link's queue, update in flight and next seq, what the
//! value coding rounded off, and the last update applied from the peer. The
//! write-ahead log records the changes since ([`MirrorState::apply`]
//! replays them).

use std::collections::{BTreeMap, BTreeSet};

use geoml_proto::rows::{pack_indexes, pack_values, unpack_indexes, unpack_values};

use super::{MirrorError, MirrorState};
use crate::pb::mirror::{MirrorCheckpoint, PeerCheckpoint, RoundReceived};

fn pack_f64(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn unpack_f64(bytes: &[u8]) -> Option<Vec<f64>> {
    bytes.len().is_multiple_of(8).then(|| {
        bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    })
}

impl MirrorState {
    /// The mirror state a checkpoint keeps.
    #[must_use]
    pub fn checkpoint(&self) -> MirrorCheckpoint {
        MirrorCheckpoint {
            epoch: self.sender_epoch,
            accumulated: pack_values(&self.changes.accumulated),
            generated: pack_f64(&self.changes.generated),
            count: self.changes.count,
            mirror_clock: self.mirror_clock,
            checked_clock: self.checked_clock,
            queued_count: self.queued_count,
            velocity: pack_values(&self.velocity),
            completed_round: self.completed_round,
            own_round: self.own_round.as_ref().map_or(0, |r| r.0),
            own_delta: self
                .own_round
                .as_ref()
                .map(|r| pack_values(&r.1))
                .unwrap_or_default(),
            received: self
                .received
                .iter()
                .map(|(&round, (sum, from))| RoundReceived {
                    round,
                    sum: pack_values(sum),
                    from: from.iter().map(|&p| self.peers[p].name.clone()).collect(),
                })
                .collect(),
            peers: self
                .peers
                .iter()
                .map(|p| {
                    let (indexes, deltas): (Vec<u32>, Vec<f32>) = p.outbox.queued.iter().unzip();
                    let (carried_indexes, carried): (Vec<u32>, Vec<f32>) =
                        p.outbox.carried.iter().unzip();
                    PeerCheckpoint {
                        datacenter: p.name.clone(),
                        next_seq: p.outbox.next_seq,
                        in_flight: p.outbox.in_flight.clone(),
                        queued_indexes: pack_indexes(&indexes),
                        queued_deltas: pack_values(&deltas),
                        carried_indexes: pack_indexes(&carried_indexes),
                        carried_deltas: pack_values(&carried),
                        rounds: p.outbox.rounds.iter().cloned().collect(),
                        applied_epoch: p.applied.0,
                        applied_seq: p.applied.1,
                        mirror_clock: p.mirror_clock,
                        stopped: p.stopped,
                        drained: p.drained,
                    }
                })
                .collect(),
        }
    }

    /// Brings the state back to `checkpoint` (of the same shard and peers).
    pub fn restore(&mut self, checkpoint: &MirrorCheckpoint) -> Result<(), MirrorError> {
        let misfit = |what: &str| MirrorError::Durable(what.to_owned());
        let elements = self.changes.accumulated.len();
        let accumulated = unpack_values(&checkpoint.accumulated)?;
        let generated = unpack_f64(&checkpoint.generated).unwrap_or_default();
        let velocity = unpack_values(&checkpoint.velocity)?;
        let own_delta = unpack_values(&checkpoint.own_delta)?;
        if accumulated.len() != elements
            || generated.len() != elements
            || !(velocity.is_empty() || velocity.len() == elements)
            || (checkpoint.own_round > 0 && own_delta.len() != elements)
        {
            return Err(misfit("its changes have another shape"));
        }
        let mut received = BTreeMap::new();
        for r in &checkpoint.received {
            let sum = unpack_values(&r.sum)?;
            if sum.len() != elements {
                return Err(misfit("a round's deltas have another shape"));
            }
            let from = r
                .from
                .iter()
                .map(|name| self.peer(name))
                .collect::<Result<BTreeSet<_>, _>>()?;
            received.insert(r.round, (sum, from));
        }
        let mut peers = self.peers.clone();
        for saved in &checkpoint.peers {
            let p = self.peer(&saved.datacenter)?;
            let peer = &mut peers[p];
            let indexes = unpack_indexes(&saved.queued_indexes)?;
            let deltas = unpack_values(&saved.queued_deltas)?;
            if indexes.len() != deltas.len() || indexes.iter().any(|&i| i as usize >= elements) {
                return Err(misfit("a queue does not fit the shard"));
            }
            peer.outbox.next_seq = saved.next_seq.max(1);
            peer.outbox.in_flight.clone_from(&saved.in_flight);
            peer.outbox.queued = indexes.into_iter().zip(deltas).collect();
            let carried_indexes = unpack_indexes(&saved.carried_indexes)?;
            let carried = unpack_values(&saved.carried_deltas)?;
            if carried_indexes.len() != carried.len()
                || carried_indexes.iter().any(|&i| i as usize >= elements)
            {
                return Err(misfit("a link's carried remainder does not fit the shard"));
            }
            peer.outbox.carried = carried_indexes.into_iter().zip(carried).collect();
            peer.outbox.rounds = saved.rounds.iter().cloned().collect();
            peer.applied = (saved.applied_epoch, saved.applied_seq);
            peer.epoch = saved.applied_epoch;
            peer.mirror_clock = saved.mirror_clock;
            peer.stopped = saved.stopped;
            peer.drained = saved.drained;
        }
        self.peers = peers;
        self.sender_epoch = checkpoint.epoch;
        self.changes.accumulated = accumulated;
        self.changes.touch_all();
        self.changes.generated = generated;
        self.changes.count = checkpoint.count;
        self.mirror_clock = checkpoint.mirror_clock;
        self.checked_clock = checkpoint.checked_clock;
        self.queued_count = checkpoint.queued_count;
        self.velocity = velocity;
        self.completed_round = checkpoint.completed_round;
        self.own_round = (checkpoint.own_round > 0).then_some((checkpoint.own_round, own_delta));
        self.received = received;
        Ok(())
    }
}
