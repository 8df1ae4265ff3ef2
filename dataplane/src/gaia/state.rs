//! A shard's side of mirror synchronisation, as pure state: accumulated
//! updates and the significance filter, one coalescing outgoing queue per
//! peer, the selective barrier, mirror clocks, peer reachability and
//! averaging rounds (federated averaging and DiLoCo).
//!
//! No I/O: [`super::service`] moves the messages it produces and feeds it
//! the ones that arrive; [`wire`] decodes what arrives and encodes what
//! leaves, so the state itself handles indexes and deltas, not bytes;
//! [`durable`] turns it into a checkpoint and the write-ahead-log records
//! that replay every change a crash would otherwise lose.
//!
//! Each link (this shard to one peer) carries one update at a time, numbered
//! 1, 2, ... within the link and stamped with this shard's epoch; what
//! becomes significant while one is in flight is added into the link's
//! queue, element by element, so a peer that stays unreachable costs at most
//! the shard's size, however many clocks pass. A receiver applies an update
//! only if its (epoch, seq) stamp is above the last it applied from that
//! sender.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use geoml_crds::sync_policy::{OuterStep, ValueCoding};
use prost::Message;

use super::budget::{self, Allowance};
use super::significance::Filter;
use crate::pb::mirror::{Announcement, ClockTick, MirrorLogRecord, MirrorUpdate};
use crate::ps::shard::{Changes, Shard, ShardError};

mod durable;
mod elements;
mod wire;

use elements::ElementDeltas;

/// An update's place in its link: the sender's epoch, then the seq.
type Stamp = (u64, u64);

/// How long an update may go unacknowledged before the link's RTT is
/// measured without counting as piling up.
const UNMEASURED_BACKLOG: Duration = Duration::from_millis(500);

/// How the datacenters exchange updates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Exchange {
    /// Gaia's ASP: significant accumulated updates, as they become significant.
    Asp {
        /// Announce indexes on the control channel before sending data
        /// while earlier updates are still in flight.
        selective_barrier: bool,
        /// How the values of updates travel.
        coding: ValueCoding,
    },
    /// Averaging rounds: every `round_clocks` clocks, every datacenter's
    /// change since the last round is averaged, and every datacenter moves
    /// its model from where the round started by the `outer` step on that
    /// average (federated averaging: by the average itself; DiLoCo: SGD
    /// with Nesterov momentum).
    Rounds {
        /// Clocks per round (DiLoCo's H).
        round_clocks: u64,
        /// The outer optimizer.
        outer: OuterStep,
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
    /// Per peer, the bandwidth of the WAN link to it in Mbit/s, if shaped
    /// (`geoml_crds::datacenter::link_bandwidth_mbps`): what the
    /// bandwidth-budget schedule budgets.
    pub link_mbps: Vec<Option<f64>>,
    /// Parameter servers of this datacenter: they share each link's budget.
    pub shards: usize,
    /// A peer silent this long stops counting for the mirror-clock bound
    /// (and its announcements expire) until it is heard again; `None`:
    /// never.
    pub peer_timeout: Option<Duration>,
}

impl MirrorConfig {
    /// Bytes per second this shard may put on the link to peer `p`
    /// (`BandwidthBudget`): its share of the link's budget.
    fn link_budget(&self, p: usize) -> Option<f64> {
        let link = self.link_mbps.get(p).copied().flatten();
        self.filter.link_budget(link, self.shards)
    }
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
    /// The update's values are in a coding this shard does not know.
    #[error("mirror update: unknown value coding {0} (or a scale that is not finite)")]
    Coding(i32),
    /// The update does not fit the shard.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A checkpoint or log record does not fit this shard's mirrors.
    #[error("mirror state on disk does not fit this shard: {0}")]
    Durable(String),
    /// The write-ahead log could not be written.
    #[error("write-ahead log: {0}")]
    Log(#[from] std::io::Error),
}

/// A peer's update, decoded from the wire ([`MirrorUpdate`]).
#[derive(Clone, Debug, PartialEq)]
struct PeerUpdate {
    stamp: Stamp,
    indexes: Vec<u32>,
    deltas: Vec<f32>,
    announced: bool,
    round: u64,
}

/// Own deltas on their way to one peer.
#[derive(Clone, Debug, Default)]
struct Outbox {
    /// Seq of the next update formed on the link.
    next_seq: u64,
    /// The update on the wire, until the peer acknowledges it.
    in_flight: Option<MirrorUpdate>,
    /// ASP deltas waiting behind it, summed per element.
    queued: ElementDeltas,
    /// What the value coding rounded off the updates sent before, per
    /// element: it goes with the element's next queued delta, or with the
    /// last updates once training stopped, never in an update of its own.
    carried: ElementDeltas,
    /// Federated-averaging rounds waiting behind it (one message each).
    rounds: VecDeque<MirrorUpdate>,
    /// Announcements not yet sent: update seq → its elements (at most the
    /// update in flight and the next).
    announce: BTreeMap<u64, BTreeSet<u32>>,
    /// Whether update `next_seq` was announced.
    announced: bool,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.in_flight.is_none()
            && self.queued.is_empty()
            && self.carried.is_empty()
            && self.rounds.is_empty()
    }
}

/// A peer datacenter: what it told us, and our link to it.
#[derive(Clone, Debug, Default)]
struct Peer {
    name: String,
    mirror_clock: u64,
    stopped: bool,
    drained: bool,
    rtt: Option<Duration>,
    throughput: Option<f64>,
    /// The newest epoch heard from it.
    epoch: u64,
    /// The stamp of the last update applied from it.
    applied: Stamp,
    /// When it was last heard from (`None`: not since this shard started).
    last_heard: Option<Instant>,
    /// Heard from within the peer timeout.
    reachable: bool,
    /// Bytes of our messages handed to the link to this peer.
    sent_bytes: u64,
    /// Of those, bytes the peer acknowledged.
    delivered_bytes: u64,
    /// What the link may still carry (`BandwidthBudget`; `None`: no budget).
    allowance: Option<Allowance>,
    outbox: Outbox,
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

/// An announced update whose data has not arrived.
#[derive(Clone, Debug)]
struct Pending {
    rows: Vec<usize>,
    since: Instant,
}

/// A shard's mirror state.
#[derive(Debug)]
pub struct MirrorState {
    config: MirrorConfig,
    /// Changes made by this datacenter's workers.
    pub changes: Changes,
    peers: Vec<Peer>,
    /// This shard's epoch: stamps what it sends from now on.
    sender_epoch: u64,
    /// Records of own deltas queued for the peers so far.
    queued_count: u64,
    /// The clock significance was last checked at, and the threshold then.
    checked_clock: u64,
    checked_threshold: f64,
    mirror_clock: u64,
    /// When `mirror_clock` began, and how long a mirror clock lasts here
    /// (a moving average): our pace, at which the mirror-clock bound reads
    /// the peers' ticks.
    mirror_clock_began: Option<Instant>,
    pace: Option<Duration>,
    stopped: bool,
    /// This datacenter met the target metric (its shard 0 heard so).
    reached_target: bool,
    /// The peers that said their datacenter met it.
    peers_at_target: BTreeSet<usize>,
    /// Told every peer it is drained.
    drained_told: bool,
    /// Announced updates whose data has not arrived: (peer, stamp).
    pending: HashMap<(usize, Stamp), Pending>,
    /// Per local row, how many pending updates touch it.
    blocked_rows: Vec<u32>,
    /// Changes each time reads may go further (barrier released, a round
    /// completed, a peer stopped counting).
    epoch: u64,
    /// Rounds: the round sent and not yet completed, with our own delta.
    own_round: Option<(u64, Vec<f32>)>,
    completed_round: u64,
    /// Rounds: per round, the sum of peers' deltas and who sent one.
    received: BTreeMap<u64, (Vec<f32>, BTreeSet<usize>)>,
    /// Rounds: the outer step's momentum buffer, per element (in terms of
    /// the averaged change; empty until the first round completes).
    velocity: Vec<f32>,
    /// Counters.
    pub stats: Stats,
}

impl MirrorState {
    /// Mirror state of a shard with `elements` values in `rows` rows.
    #[must_use]
    pub fn new(config: MirrorConfig, elements: usize, rows: usize) -> Self {
        let now = Instant::now();
        let peers = config
            .peers
            .iter()
            .enumerate()
            .map(|(p, name)| Peer {
                name: name.clone(),
                reachable: true,
                allowance: config.link_budget(p).map(|rate| Allowance::new(rate, now)),
                outbox: Outbox {
                    next_seq: 1,
                    ..Outbox::default()
                },
                ..Peer::default()
            })
            .collect();
        Self {
            config,
            changes: Changes::new(elements),
            peers,
            sender_epoch: 0,
            queued_count: 0,
            checked_clock: 0,
            checked_threshold: f64::NAN,
            mirror_clock: 0,
            mirror_clock_began: None,
            pace: None,
            stopped: false,
            reached_target: false,
            peers_at_target: BTreeSet::new(),
            drained_told: false,
            pending: HashMap::new(),
            blocked_rows: vec![0; rows],
            epoch: 0,
            own_round: None,
            completed_round: 0,
            received: BTreeMap::new(),
            velocity: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Starts epoch `epoch` (a restarted shard passes something larger than
    /// before, such as the time it started; an epoch not above the restored
    /// one becomes the one after it). Returns the epoch in use.
    pub fn start_epoch(&mut self, epoch: u64) -> u64 {
        self.sender_epoch = epoch.max(self.sender_epoch + 1);
        self.sender_epoch
    }

    /// After a restore: the mirror clock of a shard whose slowest worker
    /// completed `min_clock` clocks (its next tick says so).
    pub fn resume_at(&mut self, min_clock: u64) {
        self.mirror_clock = min_clock / self.config.period.max(1);
    }

    /// Bumped whenever reads may go further: the selective barrier released
    /// rows, a round completed, a peer stopped counting.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The peers that hold the mirror-clock bound: training and reachable.
    fn active_peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.iter().filter(|p| !p.stopped && p.reachable)
    }

    /// The highest clock at which a worker of this datacenter may read.
    #[must_use]
    pub fn read_limit(&self) -> u64 {
        match self.config.exchange {
            Exchange::Asp { .. } => {
                let Some(slowest) = self.slowest() else {
                    return u64::MAX;
                };
                (slowest + self.config.bound + 1)
                    .saturating_mul(self.config.period)
                    .saturating_sub(1)
            }
            Exchange::Rounds { round_clocks, .. } => {
                if self.peers.iter().all(|p| p.stopped) {
                    return u64::MAX;
                }
                (self.completed_round + 1)
                    .saturating_mul(round_clocks)
                    .saturating_sub(1)
            }
        }
    }

    /// The mirror clocks `peer` may have made since the tick we last heard
    /// from it: the ones we make in one and a half round trips to it. A
    /// tick takes half a round trip to arrive, and a peer sends its next one
    /// once the last came back, so the one we hold left it at most one and a
    /// half round trips ago. Gaia's DS counts from a peer's present mirror
    /// clock; its clocks last seconds, so a tick is never old there. Ours
    /// can last a few milliseconds, where counting from the tick last heard
    /// would hold every datacenter to a few clocks per round trip. A peer
    /// slower than us still holds us back: this adds that much, never more.
    fn in_transit(&self, peer: &Peer) -> u64 {
        match (peer.rtt, self.pace) {
            (Some(rtt), Some(pace)) if !pace.is_zero() => {
                u64::try_from((rtt * 3 / 2).as_nanos() / pace.as_nanos()).unwrap_or(u64::MAX)
            }
            _ => 0,
        }
    }

    /// Where the slowest peer that holds the bound may be now: the mirror
    /// clock it told plus [`Self::in_transit`].
    fn slowest(&self) -> Option<u64> {
        self.active_peers()
            .map(|p| p.mirror_clock + self.in_transit(p))
            .min()
    }

    /// Mirror clocks a worker at `clock` is ahead of where the slowest peer
    /// may be now (what the bound counts: at most DS at a granted read).
    #[must_use]
    pub fn skew(&self, clock: u64) -> u64 {
        self.slowest()
            .map_or(0, |s| (clock / self.config.period).saturating_sub(s))
    }

    /// Whether any of `rows` waits for announced data.
    #[must_use]
    pub fn blocked(&self, rows: &[usize]) -> bool {
        !self.pending.is_empty() && rows.iter().any(|&r| self.blocked_rows[r] > 0)
    }

    /// Whether updates pile up faster than the WAN carries them: the update
    /// in flight to some peer (`backlog`: how long it has been on its way,
    /// per peer) has waited half an RTT longer than a round trip takes, so
    /// data sent now would arrive well after a control message.
    fn piling_up(&self, backlog: &[Duration]) -> bool {
        self.peers
            .iter()
            .zip(backlog)
            .any(|(peer, &age)| age > peer.rtt.map_or(UNMEASURED_BACKLOG, |rtt| rtt + rtt / 2))
    }

    /// What to queue for the peers after the slowest local worker completed
    /// `min_clock` clocks, with the shard's current `values`; `stopped` once
    /// training stopped here (everything accumulated is then flushed).
    /// `backlog`: how long the update in flight has been on its way, per
    /// peer; `now`: the time, which measures our pace. Significance is
    /// checked once per clock, and whenever stopped.
    ///
    /// Returns the record to append to the write-ahead log and then hand to
    /// [`Self::apply`], which queues it; with the selective barrier, when
    /// updates pile up, the elements are announced to every peer first
    /// ([`Self::announcement`]).
    pub fn on_clock(
        &mut self,
        values: &[f32],
        min_clock: u64,
        stopped: bool,
        backlog: &[Duration],
        now: Instant,
    ) -> Option<MirrorLogRecord> {
        if self.peers.is_empty() || (min_clock == self.checked_clock && !stopped) {
            return None;
        }
        self.checked_clock = min_clock;
        let data_busy = self.piling_up(backlog);
        self.config.filter.on_clock(min_clock);
        let mut queued = None;
        match self.config.exchange {
            Exchange::Asp {
                selective_barrier, ..
            } => {
                let (indexes, deltas) = self.significant(values, stopped);
                if stopped && !self.stopped {
                    tracing::info!(
                        elements = indexes.len(),
                        bytes_sent_before = self.stats.bytes_sent,
                        "training stopped here: every accumulated change goes to the peers"
                    );
                }
                if !indexes.is_empty() {
                    if selective_barrier && data_busy {
                        for peer in &mut self.peers {
                            let outbox = &mut peer.outbox;
                            outbox
                                .announce
                                .entry(outbox.next_seq)
                                .or_default()
                                .extend(indexes.iter().copied());
                            outbox.announced = true;
                        }
                    }
                    queued = Some(self.queued(0, &indexes, &deltas, stopped));
                }
            }
            Exchange::Rounds { round_clocks, .. } => {
                let round = min_clock / round_clocks.max(1);
                let sent = self
                    .own_round
                    .as_ref()
                    .map_or(self.completed_round, |r| r.0);
                if !stopped && round > sent {
                    let (indexes, deltas) = nonzero(&self.changes.accumulated);
                    queued = Some(self.queued(round, &indexes, &deltas, false));
                }
            }
        }
        let mirror_clock = min_clock / self.config.period;
        if mirror_clock > self.mirror_clock || (stopped && !self.stopped) {
            if let Some(began) = self.mirror_clock_began
                && let Ok(made) = u32::try_from(mirror_clock - self.mirror_clock)
                && made > 0
            {
                let last = now.saturating_duration_since(began) / made;
                // Smoothed: a burst of clocks after reads were held is not
                // our pace.
                self.pace = Some(self.pace.map_or(last, |pace| (pace * 3 + last) / 4));
            }
            self.mirror_clock_began = Some(now);
            self.mirror_clock = mirror_clock;
            self.stopped = stopped;
        }
        queued
    }

    /// The record that queues `deltas` at `indexes` (of `round`, or the
    /// `remainder` when training stopped) for every peer; numbered, so that
    /// replaying it twice queues it once.
    fn queued(
        &self,
        round: u64,
        indexes: &[u32],
        deltas: &[f32],
        remainder: bool,
    ) -> MirrorLogRecord {
        use crate::pb::mirror::mirror_log_record::Record;
        let mut update = wire::update_message(indexes, deltas);
        update.round = round;
        update.remainder = remainder;
        update.seq = self.queued_count + 1;
        MirrorLogRecord {
            record: Some(Record::Queued(update)),
        }
    }

    /// Applies the live part of a SyncPolicy change: the significance filter
    /// and WAN budget, the selective barrier, the mirror-clock bound and
    /// period. Readers waiting on the bound must be woken (the read limit
    /// may have moved).
    pub fn reconfigure(&mut self, change: &crate::ps::policy::PolicyChange) {
        if let Some(filter) = &change.filter {
            self.config.filter.reconfigure(filter);
            self.config.filter.on_clock(self.checked_clock);
            self.changes.touch_all();
            let now = Instant::now();
            for p in 0..self.peers.len() {
                let rate = self.config.link_budget(p);
                let allowance = &mut self.peers[p].allowance;
                match (rate, allowance.as_mut()) {
                    (Some(rate), Some(a)) => a.set_rate(rate, now),
                    (rate, _) => *allowance = rate.map(|r| Allowance::new(r, now)),
                }
            }
        }
        if let (
            Some(on),
            Exchange::Asp {
                selective_barrier, ..
            },
        ) = (change.selective_barrier, &mut self.config.exchange)
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

    /// The significant accumulated updates (everything when `flush`), left
    /// in place (queuing them takes them, see [`Self::apply`]). Only the
    /// elements touched since the last check are looked at, or all of them
    /// when the threshold moved: the others were not significant then and
    /// neither their change nor their value moved since.
    fn significant(&mut self, values: &[f32], flush: bool) -> (Vec<u32>, Vec<f32>) {
        let filter = &self.config.filter;
        #[allow(clippy::float_cmp)] // did the threshold move at all
        if flush || filter.threshold() != self.checked_threshold {
            self.changes.touch_all();
            self.checked_threshold = filter.threshold();
        }
        let mut indexes = Vec::new();
        let mut deltas = Vec::new();
        self.changes.drain_touched(|i, acc| {
            if acc != 0.0 && (flush || filter.significant(acc, values[i])) {
                indexes.push(u32::try_from(i).unwrap_or(u32::MAX));
                deltas.push(acc);
            }
        });
        (indexes, deltas)
    }

    /// Own deltas (record `seq`) taken from the accumulated changes and
    /// queued for every peer: ASP deltas are added into each link's queue, a
    /// round waits as its own message and becomes our open round. A
    /// `remainder` (what training left under the threshold when it stopped)
    /// is shared: every peer is sent an equal share and `shard` keeps one,
    /// so every datacenter ends with the same model, holding every update
    /// sent while training ran and the mean of what each held back. A
    /// record taken before (a log replayed over the checkpoint that already
    /// holds it) changes nothing.
    fn take(
        &mut self,
        update: &MirrorUpdate,
        indexes: &[u32],
        deltas: &[f32],
        shard: &mut Shard,
    ) -> Result<(), MirrorError> {
        let (seq, round) = (update.seq, update.round);
        if seq <= self.queued_count {
            return Ok(());
        }
        let elements = self.changes.accumulated.len();
        if indexes.len() != deltas.len() || indexes.iter().any(|&i| i as usize >= elements) {
            return Err(MirrorError::Durable(
                "a queued update does not fit the shard".into(),
            ));
        }
        self.queued_count = seq;
        for (&i, &d) in indexes.iter().zip(deltas) {
            self.changes.accumulated[i as usize] -= d;
        }
        let each;
        let deltas = if update.remainder {
            #[allow(clippy::cast_precision_loss)] // a handful of datacenters
            let datacenters = (self.peers.len() + 1) as f32;
            each = deltas.iter().map(|d| d / datacenters).collect::<Vec<_>>();
            // What the peers get of it leaves our model and our account.
            let given: Vec<f32> = deltas.iter().zip(&each).map(|(d, e)| e - d).collect();
            shard.add(indexes, &given)?;
            for (&i, &g) in indexes.iter().zip(&given) {
                self.changes.generated[i as usize] += f64::from(g);
            }
            &each[..]
        } else {
            deltas
        };
        if round == 0 {
            self.stats.elements_sent += indexes.len() as u64;
        } else {
            let mut own = vec![0.0; elements];
            for (&i, &d) in indexes.iter().zip(deltas) {
                own[i as usize] = d;
            }
            self.own_round = Some((round, own));
        }
        for peer in &mut self.peers {
            if round > 0 {
                let mut update = wire::update_message(indexes, deltas);
                update.round = round;
                peer.outbox.rounds.push_back(update);
            } else {
                for (&i, &d) in indexes.iter().zip(deltas) {
                    peer.outbox.queued.add(i, d);
                }
            }
        }
        Ok(())
    }

    /// The record that makes what is queued for peer `p` the update in
    /// flight on its link, if the link is idle and something is queued: to
    /// append to the write-ahead log, then [`Self::apply`]. A link with a
    /// budget sends, while training runs, only the most significant queued
    /// elements (their queued and carried deltas together, against the
    /// shard's current `values`) that its allowance pays for at `now`, and
    /// holds back the rest; nothing, until the allowance has room for one,
    /// unless the update was announced to the peer (its announcement blocks
    /// reads there: it goes even if all of it is held).
    #[must_use]
    pub fn form(&self, p: usize, values: &[f32], now: Instant) -> Option<MirrorLogRecord> {
        use crate::pb::mirror::mirror_log_record::Record;
        let peer = self.peers.get(p)?;
        let outbox = &peer.outbox;
        let carried = self.stopped && !outbox.carried.is_empty();
        if outbox.in_flight.is_some()
            || (outbox.queued.is_empty() && outbox.rounds.is_empty() && !carried)
        {
            return None;
        }
        let announced = outbox.announced && outbox.rounds.is_empty();
        let mut held = Vec::new();
        if let Some(allowance) = &peer.allowance
            && outbox.rounds.is_empty()
            && !self.stopped
        {
            let room = allowance.elements(now, self.coding());
            if room == 0 && !announced {
                return None;
            }
            let filter = &self.config.filter;
            let ranked = outbox
                .queued
                .iter()
                .map(|(i, d)| {
                    let pending = d + outbox.carried.get(i).unwrap_or(0.0);
                    let value = values.get(i as usize).copied().unwrap_or(0.0);
                    (filter.significance(pending, value), i)
                })
                .collect();
            held = budget::held_back(ranked, room);
        }
        Some(MirrorLogRecord {
            record: Some(Record::Formed(crate::pb::mirror::Formed {
                peer: u32::try_from(p).unwrap_or(u32::MAX),
                epoch: self.sender_epoch,
                seq: outbox.next_seq,
                announced,
                exact: self.stopped,
                held: geoml_proto::rows::pack_indexes(&held),
            })),
        })
    }

    /// How long from `now` until the link to peer `p` may form its next
    /// update, as far as its budget goes (`None`: no budget).
    #[must_use]
    pub fn budget_wait(&self, p: usize, now: Instant) -> Option<Duration> {
        let allowance = self.peers.get(p)?.allowance.as_ref()?;
        Some(allowance.wait(now, self.coding()))
    }

    /// The link to peer `p` carried a message of `bytes` (framing added
    /// here) at `now`: its budget pays for it.
    fn spend(&mut self, p: usize, bytes: u64, now: Instant) {
        if let Some(allowance) = self
            .peers
            .get_mut(p)
            .and_then(|peer| peer.allowance.as_mut())
        {
            allowance.spend(bytes + budget::CALL_BYTES, now);
        }
    }

    /// How ASP updates code their values while training runs.
    fn coding(&self) -> ValueCoding {
        match self.config.exchange {
            Exchange::Asp { coding, .. } => coding,
            Exchange::Rounds { .. } => ValueCoding::Float32,
        }
    }

    /// Makes the queue of peer `p` the update `stamp` in flight, its values
    /// coded as the SyncPolicy says, or `exact`ly; the `held` elements stay
    /// queued.
    fn formed(
        &mut self,
        p: usize,
        stamp: Stamp,
        announced: bool,
        exact: bool,
        held: &[u32],
    ) -> Result<(), MirrorError> {
        let datacenter = self.config.datacenter.clone();
        let coding = if exact {
            ValueCoding::Float32
        } else {
            self.coding()
        };
        let peer = self
            .peers
            .get_mut(p)
            .ok_or_else(|| MirrorError::Durable(format!("no peer {p}")))?;
        let outbox = &mut peer.outbox;
        if stamp.1 < outbox.next_seq {
            // Replayed over the checkpoint that already holds it.
            return Ok(());
        }
        if stamp.1 != outbox.next_seq {
            return Err(MirrorError::Durable(format!(
                "update {} formed where update {} was next",
                stamp.1, outbox.next_seq
            )));
        }
        // A replayed log holds no acknowledgements: forming the next update
        // means the one before was acknowledged.
        let mut update = if let Some(round) = outbox.rounds.pop_front() {
            round
        } else {
            let held: Vec<(u32, f32)> = held
                .iter()
                .filter_map(|&i| outbox.queued.remove(i).map(|d| (i, d)))
                .collect();
            // What earlier updates rounded off goes with its element's next
            // delta; once stopped, all of it goes.
            if exact {
                let (indexes, carried) = outbox.carried.drain();
                for (i, c) in indexes.into_iter().zip(carried) {
                    outbox.queued.add(i, c);
                }
            }
            let (indexes, mut deltas) = outbox.queued.drain();
            if !exact {
                for (&i, d) in indexes.iter().zip(&mut deltas) {
                    *d += outbox.carried.remove(i).unwrap_or(0.0);
                }
            }
            for (i, d) in held {
                outbox.queued.insert(i, d);
            }
            // What the coding rounds off stays with this peer's link.
            let (mut update, kept) = wire::coded_update(&indexes, &deltas, coding);
            for (i, c) in kept {
                outbox.carried.insert(i, c);
            }
            update.announced = announced;
            update
        };
        update.datacenter = datacenter;
        update.epoch = stamp.0;
        update.seq = stamp.1;
        outbox.announced = false;
        outbox.next_seq = stamp.1 + 1;
        // Replayed from the log of an earlier run, the epoch is that run's.
        self.sender_epoch = self.sender_epoch.max(stamp.0);
        let bytes = update.encoded_len() as u64;
        outbox.in_flight = Some(update);
        peer.sent_bytes += bytes;
        self.stats.updates_sent += 1;
        self.stats.bytes_sent += bytes;
        Ok(())
    }

    /// The update in flight to peer `p`, to send (again, until acknowledged).
    #[must_use]
    pub fn in_flight(&self, p: usize) -> Option<&MirrorUpdate> {
        self.peers.get(p)?.outbox.in_flight.as_ref()
    }

    /// Peer `p` acknowledged update `stamp` at `now` (or refused it for
    /// good): the link is idle.
    pub fn acknowledged(&mut self, p: usize, stamp: Stamp, now: Instant) {
        if let Some(peer) = self.peers.get_mut(p)
            && peer
                .outbox
                .in_flight
                .as_ref()
                .is_some_and(|u| (u.epoch, u.seq) == stamp)
            && let Some(update) = peer.outbox.in_flight.take()
        {
            let bytes = update.encoded_len() as u64;
            peer.delivered_bytes += bytes;
            // Its announcement, if still unsent, would block nothing.
            peer.outbox.announce.retain(|&seq, _| seq > update.seq);
            // Charged on acknowledgement: the link forms nothing else
            // while it is in flight.
            self.spend(p, bytes, now);
        }
    }

    /// Elements and updates waiting for peer `p` (queued plus in flight):
    /// what an unreachable peer costs this shard.
    #[must_use]
    pub fn backlog_elements(&self, p: usize) -> usize {
        self.peers.get(p).map_or(0, |peer| {
            let outbox = &peer.outbox;
            outbox.queued.len()
                + outbox.carried.len()
                + outbox.rounds.iter().map(|r| r.indexes.len()).sum::<usize>()
                + outbox
                    .in_flight
                    .as_ref()
                    .map_or(0, |u| wire::indexes(u, usize::MAX).map_or(0, |i| i.len()))
        })
    }

    /// The announcement to send peer `p` on the control channel, if any:
    /// the elements the next update on its link will carry.
    #[must_use]
    pub fn announcement(&self, p: usize) -> Option<Announcement> {
        let (&seq, indexes) = self.peers.get(p)?.outbox.announce.first_key_value()?;
        // A recovered update in flight keeps its old epoch; its
        // announcement was lost with the crash, so only current ones go.
        Some(Announcement {
            datacenter: self.config.datacenter.clone(),
            seq,
            indexes: geoml_proto::rows::pack_indexes(&indexes.iter().copied().collect::<Vec<_>>()),
            epoch: self.sender_epoch,
        })
    }

    /// Peer `p` took the announcement of `seq`, of `bytes`, at `now`.
    pub fn announcement_sent(&mut self, p: usize, seq: u64, bytes: usize, now: Instant) {
        if let Some(peer) = self.peers.get_mut(p) {
            peer.outbox.announce.remove(&seq);
            peer.sent_bytes += bytes as u64;
            peer.delivered_bytes += bytes as u64;
            self.stats.bytes_sent += bytes as u64;
        }
        self.spend(p, bytes as u64, now);
    }

    /// This shard's clock tick, as every peer should hear it now.
    #[must_use]
    pub fn tick(&self) -> ClockTick {
        ClockTick {
            datacenter: self.config.datacenter.clone(),
            mirror_clock: self.mirror_clock,
            stopped: self.stopped,
            drained: self.drained_told,
            epoch: self.sender_epoch,
            reached_target: self.reached_target,
        }
    }

    /// Peer `p` took a tick of `bytes` after `rtt`, at `now`.
    pub fn tick_sent(&mut self, p: usize, bytes: usize, rtt: Duration, now: Instant) {
        if let Some(peer) = self.peers.get_mut(p) {
            peer.rtt = Some(rtt);
            peer.sent_bytes += bytes as u64;
            peer.delivered_bytes += bytes as u64;
            self.stats.bytes_sent += bytes as u64;
        }
        self.spend(p, bytes as u64, now);
    }

    fn peer(&self, name: &str) -> Result<usize, MirrorError> {
        self.peers
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| MirrorError::UnknownPeer(name.to_owned()))
    }

    /// Peer `datacenter` spoke at `now` in `epoch`: it counts again if it
    /// had gone silent (returns `Some(true)` then), and announcements from
    /// its earlier epochs are void (it restarted; it may never send them).
    /// The reply to it travels on our link to it: the link's budget pays.
    pub fn heard(
        &mut self,
        datacenter: &str,
        epoch: u64,
        now: Instant,
    ) -> Result<Option<bool>, MirrorError> {
        let p = self.peer(datacenter)?;
        let peer = &mut self.peers[p];
        peer.last_heard = Some(now);
        let back = !peer.reachable;
        peer.reachable = true;
        if epoch > peer.epoch {
            peer.epoch = epoch;
            self.release(|&(q, (e, _)), _| q == p && e < epoch);
        }
        self.spend(p, 0, now);
        Ok(back.then_some(true))
    }

    /// Releases the pending announcements `void` picks.
    fn release(&mut self, void: impl Fn(&(usize, Stamp), &Pending) -> bool) {
        let keys: Vec<(usize, Stamp)> = self
            .pending
            .iter()
            .filter(|(k, v)| void(k, v))
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return;
        }
        for key in keys {
            if let Some(pending) = self.pending.remove(&key) {
                for r in pending.rows {
                    self.blocked_rows[r] -= 1;
                }
            }
        }
        self.epoch += 1;
    }

    /// What the passing of time changes at `now`: a peer silent for longer
    /// than the peer timeout stops counting for the mirror-clock bound, and
    /// announcements older than that expire. Returns the peers whose
    /// reachability changed, with their new state.
    pub fn refresh(&mut self, now: Instant) -> Vec<(String, bool)> {
        let Some(timeout) = self.config.peer_timeout else {
            return Vec::new();
        };
        let mut changed = Vec::new();
        for peer in &mut self.peers {
            let since = *peer.last_heard.get_or_insert(now);
            if peer.reachable && now.saturating_duration_since(since) > timeout {
                peer.reachable = false;
                changed.push((peer.name.clone(), false));
            }
        }
        if !changed.is_empty() {
            self.epoch += 1;
        }
        self.release(|_, pending| now.saturating_duration_since(pending.since) > timeout);
        changed
    }

    /// This datacenter met the target metric: its ticks say so from now on.
    /// Returns whether it may stop, that is whether every peer met it too,
    /// stopped or cannot be heard; until then it trains on, so that no
    /// datacenter is left training alone on its part of the data.
    pub fn target_reached(&mut self) -> bool {
        self.reached_target = true;
        self.may_stop_on_target()
    }

    /// Whether this datacenter met the target and every peer met it too,
    /// stopped or cannot be heard.
    #[must_use]
    pub fn may_stop_on_target(&self) -> bool {
        self.reached_target
            && self
                .peers
                .iter()
                .enumerate()
                .all(|(i, p)| self.peers_at_target.contains(&i) || p.stopped || !p.reachable)
    }

    /// Whether this datacenter or a peer met the target metric.
    #[must_use]
    pub fn target_met_anywhere(&self) -> bool {
        self.reached_target || !self.peers_at_target.is_empty()
    }

    /// Peers that count for the mirror-clock bound: reachable and training.
    #[must_use]
    pub fn peers_reachable(&self) -> usize {
        self.active_peers().count()
    }

    /// A peer's clock tick.
    pub fn on_tick(&mut self, tick: &ClockTick, shard: &mut Shard) -> Result<(), MirrorError> {
        let p = self.peer(&tick.datacenter)?;
        let peer = &mut self.peers[p];
        peer.mirror_clock = peer.mirror_clock.max(tick.mirror_clock);
        peer.drained |= tick.drained;
        if tick.reached_target {
            self.peers_at_target.insert(p);
        }
        if (tick.stopped || tick.drained) && !peer.stopped {
            peer.stopped = true;
            self.epoch += 1;
            // A stopped peer sends no more rounds; one may be complete now.
            self.complete_round(shard);
        }
        Ok(())
    }

    /// Peer `p` announces `indexes`, the elements of its update `stamp`,
    /// at `now`.
    fn announced(
        &mut self,
        p: usize,
        stamp: Stamp,
        indexes: &[u32],
        shard: &Shard,
        now: Instant,
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
        let peer = &self.peers[p];
        // Its data arrived already, or it belongs to an epoch that is over.
        if stamp <= peer.applied || stamp.0 < peer.epoch {
            return Ok(());
        }
        let key = (p, stamp);
        let mut rows: Vec<usize> = indexes.iter().map(|&i| shard.row_of(i)).collect();
        rows.dedup();
        if let Some(old) = self.pending.remove(&key) {
            for r in old.rows {
                self.blocked_rows[r] -= 1;
            }
        }
        for &r in &rows {
            self.blocked_rows[r] += 1;
        }
        self.pending.insert(key, Pending { rows, since: now });
        Ok(())
    }

    /// Peer `p`'s update: new (above the last applied from `p`) and checked.
    fn accept(&self, p: usize, update: &PeerUpdate, shard: &Shard) -> Result<bool, MirrorError> {
        if update.stamp <= self.peers[p].applied {
            return Ok(false);
        }
        shard.check_add(&update.indexes, &update.deltas)?;
        Ok(true)
    }

    /// Peer `p`'s update, accepted: applied to `shard`.
    fn apply_update(
        &mut self,
        p: usize,
        update: &PeerUpdate,
        shard: &mut Shard,
    ) -> Result<(), MirrorError> {
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
            // A value that moved may make what we accumulated significant.
            for &i in indexes {
                self.changes.touch(i as usize);
            }
        }
        let peer = &mut self.peers[p];
        peer.applied = update.stamp;
        peer.epoch = peer.epoch.max(update.stamp.0);
        // Announcements up to this update are answered (the link carries
        // its updates in order).
        let (stamp, announced) = (update.stamp, update.announced);
        if announced || self.pending.keys().any(|&(q, _)| q == p) {
            self.release(|&(q, s), _| q == p && s <= stamp);
        }
        Ok(())
    }

    /// Closes the round we sent once every active peer's delta is in: the
    /// deltas are averaged, and the model moves from where the round
    /// started by the outer step on that average.
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
        let outer = match self.config.exchange {
            Exchange::Rounds { outer, .. } => outer,
            Exchange::Asp { .. } => OuterStep::FED_AVG,
        };
        if self.velocity.len() != own.len() {
            self.velocity = vec![0.0; own.len()];
        }
        // Our delta is already in our values, which stand at start + own:
        // value += outer(mean of own and the others') − own.
        #[allow(clippy::cast_precision_loss)] // a handful of datacenters
        let n = (from.len() + 1) as f32;
        let mut indexes = Vec::new();
        let mut deltas = Vec::new();
        for (i, (&o, velocity)) in own.iter().zip(&mut self.velocity).enumerate() {
            let others = sum.get(i).copied().unwrap_or(0.0);
            let d = outer.step((others + o) / n, velocity) - o;
            if d != 0.0 {
                indexes.push(u32::try_from(i).unwrap_or(u32::MAX));
                deltas.push(d);
            }
        }
        // Indexes come from our own layout and the deltas from checked
        // ones; only an outer step that overflows can be refused.
        if let Err(e) = shard.add(&indexes, &deltas) {
            tracing::warn!(round, error = %e, "averaging round: outer step not applied");
        }
        self.received.remove(&round);
        self.own_round = None;
        self.completed_round = round;
        self.epoch += 1;
    }

    /// Records the throughput an acknowledged update of `bytes` showed.
    pub fn record_transfer(&mut self, peer: usize, bytes: usize, elapsed: Duration) {
        let Some(peer) = self.peers.get_mut(peer) else {
            return;
        };
        let rtt = peer.rtt.unwrap_or_default();
        let busy = elapsed.saturating_sub(rtt).max(Duration::from_millis(1));
        #[allow(clippy::cast_precision_loss)] // byte counts are far below 2^52
        let sample = bytes as f64 / busy.as_secs_f64();
        peer.throughput = Some(peer.throughput.map_or(sample, |t| 0.8 * t + 0.2 * sample));
    }

    /// Whether training stopped here and nothing of ours is left to send:
    /// nothing accumulated, queued or in flight.
    #[must_use]
    pub fn drained(&self) -> bool {
        self.stopped
            && self.peers.iter().all(|p| p.outbox.is_empty())
            && (matches!(self.config.exchange, Exchange::Rounds { .. })
                || self.changes.accumulated.iter().all(|&a| a == 0.0))
    }

    /// The tick that tells every peer this shard is drained (see
    /// [`Self::drained`]) and sends nothing more; later ticks repeat it.
    pub fn drained_tick(&mut self) -> ClockTick {
        self.drained_told = true;
        self.tick()
    }

    /// Whether every peer said it is drained: none sends anything more, so
    /// this shard may exit without leaving a peer's update undelivered.
    #[must_use]
    pub fn peers_drained(&self) -> bool {
        self.peers.iter().all(|p| p.drained)
    }

    /// Whether a peer that has not said it is drained was heard within
    /// `limit` before `now` (one never heard was not).
    #[must_use]
    pub fn undrained_heard_within(&self, now: Instant, limit: Duration) -> bool {
        self.peers.iter().any(|p| {
            !p.drained
                && p.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) <= limit)
        })
    }

    /// Peers, in `MirrorConfig::peers` order.
    #[must_use]
    pub fn peer_names(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.name.clone()).collect()
    }
}

/// The non-zero elements of `dense`, as indexes and deltas.
fn nonzero(dense: &[f32]) -> (Vec<u32>, Vec<f32>) {
    dense
        .iter()
        .enumerate()
        .filter(|(_, d)| **d != 0.0)
        .map(|(i, &d)| (u32::try_from(i).unwrap_or(u32::MAX), d))
        .unzip()
}

#[cfg(test)]
mod tests;
