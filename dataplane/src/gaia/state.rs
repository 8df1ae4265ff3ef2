//! A shard's side of mirror synchronisation, as pure state: accumulated
//! updates and the significance filter, the selective barrier, mirror clocks
//! and federated-averaging rounds. No I/O; [`super::service`] moves the
//! messages it produces and feeds it the ones that arrive; [`wire`]
//! decodes what arrives and encodes what leaves, so the state itself
//! handles indexes and deltas, not bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use prost::Message;

use super::significance::Filter;
use crate::pb::mirror::{Announcement, ClockTick, MirrorUpdate};
use crate::ps::shard::{Changes, Shard, ShardError};

mod wire;

/// How long an update may go unacknowledged before the link's RTT is
/// measured without counting as piling up.
const UNMEASURED_BACKLOG: Duration = Duration::from_millis(500);

/// How the datacenters exchange updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exchange {
    /// Gaia's ASP: significant accumulated updates, as they become significant.
    Asp {
        /// Announce indexes on the control channel before sending data
        /// while earlier updates are still in flight.
        selective_barrier: bool,
    },
    /// Federated averaging: every `round_clocks` clocks, every datacenter's
    /// change since the last round is averaged into everyone's model.
    FedAvg {
        /// Clocks per round.
        round_clocks: u64,
    },
}

/// Everything a shard needs to know about its mirrors.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// This shard's datacenter.
    pub datacenter: String,
    /// The other datacenters, in a fixed order.
    pub peers: Vec<String>,
    /// What is exchanged.
    pub exchange: Exchange,
    /// Clocks per mirror clock.
    pub period: u64,
    /// DS: mirror clocks a datacenter may run ahead of the slowest.
    pub bound: u64,
    /// The significance filter (ASP).
    pub filter: Filter,
}

/// Why a mirror message is refused.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The sender is not one of this shard's peers.
    #[error("datacenter {0:?} is not a mirror of this shard")]
    UnknownPeer(String),
    /// The indexes or values are malformed.
    #[error(transparent)]
    Rows(#[from] geoml_proto::rows::RowsError),
    /// The update does not fit the shard.
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// A peer's update, decoded from the wire ([`MirrorUpdate`]).
#[derive(Clone, Debug, PartialEq)]
struct PeerUpdate {
    seq: u64,
    indexes: Vec<u32>,
    deltas: Vec<f32>,
    announced: bool,
    round: u64,
}

/// What a peer datacenter told us.
#[derive(Clone, Debug, Default)]
struct Peer {
    name: String,
    mirror_clock: u64,
    stopped: bool,
    drained: bool,
    rtt: Option<Duration>,
    throughput: Option<f64>,
    applied: HashSet<u64>,
    /// Bytes of our messages handed to the link to this peer.
    sent_bytes: u64,
    /// Of those, bytes the peer acknowledged.
    delivered_bytes: u64,
}

/// Messages to send to every peer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outgoing {
    /// Control channel, before `update`.
    pub announce: Option<Announcement>,
    /// Data channel.
    pub update: Option<MirrorUpdate>,
    /// Control channel.
    pub tick: Option<ClockTick>,
}

/// Counters reported in the shard's status.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Elements sent (once each, however many peers).
    pub elements_sent: u64,
    /// Update messages sent, summed over peers.
    pub updates_sent: u64,
    /// Mirror message bytes sent, summed over peers.
    pub bytes_sent: u64,
    /// Reads held by the selective barrier.
    pub barrier_blocks: u64,
    /// Seconds reads were held by the selective barrier.
    pub barrier_wait: f64,
    /// Reads held by the mirror-clock bound or a round.
    pub clock_blocks: u64,
    /// Seconds reads were held by the mirror-clock bound or a round.
    pub clock_wait: f64,
    /// Most mirror clocks ahead of the slowest peer at a granted read.
    pub max_skew: u64,
}

/// A shard's mirror state.
#[derive(Debug)]
pub struct MirrorState {
    config: MirrorConfig,
    /// Changes made by this datacenter's workers.
    pub changes: Changes,
    peers: Vec<Peer>,
    seq: u64,
    /// The clock significance was last checked at.
    checked_clock: u64,
    mirror_clock: u64,
    stopped: bool,
    /// Announced updates whose data has not arrived: (peer, seq) → rows.
    pending: HashMap<(usize, u64), Vec<usize>>,
    /// Per local row, how many pending updates touch it.
    blocked_rows: Vec<u32>,
    /// Announced updates whose data arrived before the announcement.
    early: HashSet<(usize, u64)>,
    /// Changes each pending barrier-epoch bump.
    epoch: u64,
    /// FedAvg: the round sent and not yet completed, with our own delta.
    own_round: Option<(u64, Vec<f32>)>,
    completed_round: u64,
    /// FedAvg: per round, the sum of peers' deltas and who sent one.
    received: BTreeMap<u64, (Vec<f32>, BTreeSet<usize>)>,
    /// Bytes sent per link since `window_start` (bandwidth budget).
    window_bytes: u64,
    window_start: Instant,
    /// Counters.
    pub stats: Stats,
}

impl MirrorState {
    /// Mirror state of a shard with `elements` values in `rows` rows.
    #[must_use]
    pub fn new(config: MirrorConfig, elements: usize, rows: usize) -> Self {
        let peers = config
            .peers
            .iter()
            .map(|name| Peer {
                name: name.clone(),
                ..Peer::default()
            })
            .collect();
        Self {
            config,
            changes: Changes::new(elements),
            peers,
            seq: 0,
            checked_clock: 0,
            mirror_clock: 0,
            stopped: false,
            pending: HashMap::new(),
            blocked_rows: vec![0; rows],
            early: HashSet::new(),
            epoch: 0,
            own_round: None,
            completed_round: 0,
            received: BTreeMap::new(),
            window_bytes: 0,
            window_start: Instant::now(),
            stats: Stats::default(),
        }
    }

    /// Bumped whenever the selective barrier or a round releases reads.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn active_peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.iter().filter(|p| !p.stopped)
    }

    /// The highest clock at which a worker of this datacenter may read.
    #[must_use]
    pub fn read_limit(&self) -> u64 {
        if self.active_peers().next().is_none() {
            return u64::MAX;
        }
        match self.config.exchange {
            Exchange::Asp { .. } => {
                let slowest = self
                    .active_peers()
                    .map(|p| p.mirror_clock)
                    .min()
                    .unwrap_or(0);
                (slowest + self.config.bound + 1)
                    .saturating_mul(self.config.period)
                    .saturating_sub(1)
            }
            Exchange::FedAvg { round_clocks } => (self.completed_round + 1)
                .saturating_mul(round_clocks)
                .saturating_sub(1),
        }
    }

    /// Mirror clocks a worker at `clock` is ahead of the slowest peer.
    #[must_use]
    pub fn skew(&self, clock: u64) -> u64 {
        let slowest = self.active_peers().map(|p| p.mirror_clock).min();
        slowest.map_or(0, |s| (clock / self.config.period).saturating_sub(s))
    }

    /// Whether any of `rows` waits for announced data.
    #[must_use]
    pub fn blocked(&self, rows: &[usize]) -> bool {
        !self.pending.is_empty() && rows.iter().any(|&r| self.blocked_rows[r] > 0)
    }

    /// Whether updates pile up faster than the WAN carries them: the oldest
    /// update still unacknowledged by some peer (`backlog`, per peer) has
    /// waited half an RTT longer than a round trip takes, so data sent now
    /// would arrive well after a control message.
    fn piling_up(&self, backlog: &[Duration]) -> bool {
        self.peers
            .iter()
            .zip(backlog)
            .any(|(peer, &age)| age > peer.rtt.map_or(UNMEASURED_BACKLOG, |rtt| rtt + rtt / 2))
    }

    /// What to send after the slowest local worker completed `min_clock`
    /// clocks, with the shard's current `values`; `stopped` once training
    /// stopped here (everything accumulated is then flushed). `backlog`: how
    /// long the oldest unacknowledged update has been on its way, per peer. Significance is
    /// checked once per clock, and whenever stopped.
    pub fn on_clock(
        &mut self,
        values: &[f32],
        min_clock: u64,
        stopped: bool,
        backlog: &[Duration],
    ) -> Outgoing {
        let mut out = Outgoing::default();
        if self.peers.is_empty() || (min_clock == self.checked_clock && !stopped) {
            return out;
        }
        self.checked_clock = min_clock;
        let data_busy = self.piling_up(backlog);
        self.config.filter.on_clock(min_clock);
        match self.config.exchange {
            Exchange::Asp { selective_barrier } => {
                out.update = self.significant(values, stopped);
                if let Some(update) = &mut out.update
                    && selective_barrier
                    && data_busy
                {
                    update.announced = true;
                    out.announce = Some(Announcement {
                        datacenter: self.config.datacenter.clone(),
                        seq: update.seq,
                        indexes: update.indexes.clone(),
                    });
                }
            }
            Exchange::FedAvg { round_clocks } => {
                let round = min_clock / round_clocks.max(1);
                let sent = self
                    .own_round
                    .as_ref()
                    .map_or(self.completed_round, |r| r.0);
                if !stopped && round > sent {
                    let own =
                        std::mem::replace(&mut self.changes.accumulated, vec![0.0; values.len()]);
                    let mut update = self.update_of(&own);
                    update.round = round;
                    out.update = Some(update);
                    self.own_round = Some((round, own));
                }
            }
        }
        let mirror_clock = min_clock / self.config.period;
        if mirror_clock > self.mirror_clock || (stopped && !self.stopped) {
            self.mirror_clock = mirror_clock;
            self.stopped = stopped;
            out.tick = Some(ClockTick {
                datacenter: self.config.datacenter.clone(),
                mirror_clock,
                stopped,
                drained: false,
            });
            let elapsed = self.window_start.elapsed().as_secs_f64();
            if elapsed > 0.0 {
                #[allow(clippy::cast_precision_loss)] // byte counts are far below 2^52
                self.config
                    .filter
                    .on_rate(self.window_bytes as f64 / elapsed);
            }
            self.window_bytes = 0;
            self.window_start = Instant::now();
        }
        self.count(&out);
        out
    }

    /// Applies the live part of a SyncPolicy change: the significance filter
    /// and WAN budget, the selective barrier, the mirror-clock bound and
    /// period. Readers waiting on the bound must be woken (the read limit
    /// may have moved).
    pub fn reconfigure(&mut self, change: &crate::ps::policy::PolicyChange) {
        if let Some(filter) = &change.filter {
            self.config.filter.reconfigure(filter);
            self.config.filter.on_clock(self.checked_clock);
        }
        if let (Some(on), Exchange::Asp { selective_barrier }) =
            (change.selective_barrier, &mut self.config.exchange)
        {
            *selective_barrier = on;
        }
        if let Some(bound) = change.mirror_clock_bound {
            self.config.bound = bound;
        }
        if let Some(period) = change.mirror_clock_period {
            self.config.period = period;
        }
        self.epoch += 1;
    }

    /// The current significance threshold.
    #[must_use]
    pub fn threshold(&self) -> f64 {
        self.config.filter.threshold()
    }

    /// The significant accumulated updates (everything when `flush`) as an
    /// update, resetting what it takes; `None` when there is nothing.
    fn significant(&mut self, values: &[f32], flush: bool) -> Option<MirrorUpdate> {
        let filter = &self.config.filter;
        let mut indexes = Vec::new();
        let mut deltas = Vec::new();
        for (i, (acc, value)) in self.changes.accumulated.iter_mut().zip(values).enumerate() {
            if *acc != 0.0 && (flush || filter.significant(*acc, *value)) {
                indexes.push(u32::try_from(i).unwrap_or(u32::MAX));
                deltas.push(*acc);
                *acc = 0.0;
            }
        }
        (!indexes.is_empty()).then(|| self.update(&indexes, &deltas))
    }

    /// The non-zero elements of `dense` as an update.
    fn update_of(&mut self, dense: &[f32]) -> MirrorUpdate {
        let (indexes, deltas): (Vec<u32>, Vec<f32>) = dense
            .iter()
            .enumerate()
            .filter(|(_, d)| **d != 0.0)
            .map(|(i, &d)| (u32::try_from(i).unwrap_or(u32::MAX), d))
            .unzip();
        self.update(&indexes, &deltas)
    }

    fn count(&mut self, out: &Outgoing) {
        let peers = self.peers.len() as u64;
        let bytes = out.announce.as_ref().map_or(0, Message::encoded_len)
            + out.update.as_ref().map_or(0, Message::encoded_len)
            + out.tick.as_ref().map_or(0, Message::encoded_len);
        self.window_bytes += bytes as u64;
        self.stats.bytes_sent += bytes as u64 * peers;
        for peer in &mut self.peers {
            peer.sent_bytes += bytes as u64;
        }
        if out.update.is_some() {
            self.stats.updates_sent += peers;
        }
    }

    fn peer(&self, name: &str) -> Result<usize, MirrorError> {
        self.peers
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| MirrorError::UnknownPeer(name.to_owned()))
    }

    /// A peer's clock tick.
    pub fn on_tick(&mut self, tick: &ClockTick, shard: &mut Shard) -> Result<(), MirrorError> {
        let p = self.peer(&tick.datacenter)?;
        let peer = &mut self.peers[p];
        peer.mirror_clock = peer.mirror_clock.max(tick.mirror_clock);
        peer.drained |= tick.drained;
        if (tick.stopped || tick.drained) && !peer.stopped {
            peer.stopped = true;
            // A stopped peer sends no more rounds; one may be complete now.
            self.complete_round(shard);
        }
        Ok(())
    }

    /// Peer `p` announces `indexes`, the elements of its update `seq`.
    fn announced(
        &mut self,
        p: usize,
        seq: u64,
        indexes: &[u32],
        shard: &Shard,
    ) -> Result<(), MirrorError> {
        if let Some(&index) = indexes
            .iter()
            .find(|&&i| i as usize >= shard.values().len())
        {
            return Err(ShardError::NoElement {
                index,
                elements: shard.values().len(),
            }
            .into());
        }
        let key = (p, seq);
        if self.early.remove(&key) || self.peers[p].applied.contains(&seq) {
            return Ok(());
        }
        let mut rows: Vec<usize> = indexes.iter().map(|&i| shard.row_of(i)).collect();
        rows.dedup();
        for &r in &rows {
            self.blocked_rows[r] += 1;
        }
        self.pending.insert(key, rows);
        Ok(())
    }

    /// Peer `p`'s update, not applied before: applied to `shard`.
    /// Returns whether it was new.
    fn apply_update(
        &mut self,
        p: usize,
        update: &PeerUpdate,
        shard: &mut Shard,
    ) -> Result<bool, MirrorError> {
        let (indexes, deltas) = (&update.indexes, &update.deltas);
        if update.round > 0 {
            shard.check_add(indexes, deltas)?;
            let (sum, from) = self
                .received
                .entry(update.round)
                .or_insert_with(|| (vec![0.0; shard.values().len()], BTreeSet::new()));
            for (&i, &d) in indexes.iter().zip(deltas) {
                sum[i as usize] += d;
            }
            from.insert(p);
            self.complete_round(shard);
        } else {
            shard.add(indexes, deltas)?;
        }
        self.peers[p].applied.insert(update.seq);
        if update.announced {
            let key = (p, update.seq);
            match self.pending.remove(&key) {
                Some(rows) => {
                    for r in rows {
                        self.blocked_rows[r] -= 1;
                    }
                    self.epoch += 1;
                }
                None => {
                    self.early.insert(key);
                }
            }
        }
        Ok(true)
    }

    /// Averages the round we sent once every active peer's delta is in.
    fn complete_round(&mut self, shard: &mut Shard) {
        let Some((round, own)) = &self.own_round else {
            return;
        };
        let round = *round;
        let empty = (Vec::new(), BTreeSet::new());
        let (sum, from) = self.received.get(&round).unwrap_or(&empty);
        let missing = self
            .peers
            .iter()
            .enumerate()
            .any(|(p, peer)| !peer.stopped && !from.contains(&p));
        if missing {
            return;
        }
        // Our delta is already in our values: value += (Σ others − (n−1)·own) / n.
        #[allow(clippy::cast_precision_loss)] // a handful of datacenters
        let n = (from.len() + 1) as f32;
        let mut indexes = Vec::new();
        let mut deltas = Vec::new();
        for (i, &o) in own.iter().enumerate() {
            let others = sum.get(i).copied().unwrap_or(0.0);
            let d = (others - (n - 1.0) * o) / n;
            if d != 0.0 {
                indexes.push(u32::try_from(i).unwrap_or(u32::MAX));
                deltas.push(d);
            }
        }
        // Indexes come from our own layout and the deltas from checked ones.
        let _ = shard.add(&indexes, &deltas);
        self.received.remove(&round);
        self.own_round = None;
        self.completed_round = round;
        self.epoch += 1;
    }

    /// Records a round-trip time to `peer` measured by a tick.
    pub fn record_rtt(&mut self, peer: usize, rtt: Duration) {
        self.peers[peer].rtt = Some(rtt);
    }

    /// Records that `peer` acknowledged a message of `bytes`.
    pub fn record_delivered(&mut self, peer: usize, bytes: usize) {
        self.peers[peer].delivered_bytes += bytes as u64;
    }

    /// Records the throughput an acknowledged update of `bytes` showed.
    pub fn record_transfer(&mut self, peer: usize, bytes: usize, elapsed: Duration) {
        let rtt = self.peers[peer].rtt.unwrap_or_default();
        let busy = elapsed.saturating_sub(rtt).max(Duration::from_millis(1));
        #[allow(clippy::cast_precision_loss)] // byte counts are far below 2^52
        let sample = bytes as f64 / busy.as_secs_f64();
        let peer = &mut self.peers[peer];
        peer.throughput = Some(peer.throughput.map_or(sample, |t| 0.8 * t + 0.2 * sample));
    }

    /// Whether training stopped here and nothing of ours is left to send,
    /// given how many sent updates are unacknowledged.
    #[must_use]
    pub fn drained(&self, unacknowledged: u64) -> bool {
        self.stopped
            && unacknowledged == 0
            && (matches!(self.config.exchange, Exchange::FedAvg { .. })
                || self.changes.accumulated.iter().all(|&a| a == 0.0))
    }

    /// The tick that tells every peer this shard is drained (see
    /// [`Self::drained`]) and sends nothing more.
    pub fn drained_tick(&mut self) -> ClockTick {
        let tick = ClockTick {
            datacenter: self.config.datacenter.clone(),
            mirror_clock: self.mirror_clock,
            stopped: true,
            drained: true,
        };
        self.count(&Outgoing {
            tick: Some(tick.clone()),
            ..Outgoing::default()
        });
        tick
    }

    /// Whether every peer said it is drained: none sends anything more, so
    /// this shard may exit without leaving a peer's update undelivered.
    #[must_use]
    pub fn peers_drained(&self) -> bool {
        self.peers.iter().all(|p| p.drained)
    }
}

#[cfg(test)]
mod tests;
