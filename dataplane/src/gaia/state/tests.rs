//! Unit tests of [`super::MirrorState`].

#![allow(clippy::float_cmp)] // small exact sums

use geoml_crds::sync_policy::{OuterStep, Significance, ValueCoding};
use geoml_crds::training_job::Optimizer;

use geoml_proto::rows::{Values, pack_indexes, pack_values, unpack_indexes, unpack_values};

use super::*;
use crate::model::{Layout, TensorShape};

/// One shard of a 4×2 model, all values 1, SGD with learning rate 1.
fn shard() -> Shard {
    let layout = Layout::new(vec![TensorShape {
        name: "w",
        rows: 4,
        cols: 2,
    }]);
    Shard::new(&layout, 0, 1, 1, Optimizer::Sgd, 1.0, |_, out| {
        out.fill(1.0);
    })
}

fn mirror(exchange: Exchange, period: u64, bound: u64) -> MirrorState {
    mirror_named("a", &["b", "c"], exchange, period, bound)
}

/// The mirror state of datacenter `name`, with a peer timeout of 10 s.
fn mirror_named(
    name: &str,
    peers: &[&str],
    exchange: Exchange,
    period: u64,
    bound: u64,
) -> MirrorState {
    let config = MirrorConfig {
        datacenter: name.into(),
        peers: peers.iter().map(|&p| p.to_owned()).collect(),
        exchange,
        period,
        bound,
        filter: Filter::new(
            &Significance {
                threshold: 0.1,
                ..Significance::default()
            },
            geoml_crds::sync_policy::WanBudget {
                mbps: None,
                share: geoml_crds::sync_policy::DEFAULT_WAN_BUDGET_SHARE,
            },
            1,
        ),
        link_mbps: vec![None; peers.len()],
        shards: 1,
        peer_timeout: Some(Duration::from_secs(10)),
    };
    MirrorState::new(config, 8, 4)
}

const ASP: Exchange = Exchange::Asp {
    selective_barrier: true,
    coding: ValueCoding::Float32,
};

/// Worker 0 pushes `gradient` as its next clock.
fn push(s: &mut Shard, m: &mut MirrorState, gradient: &[f32]) -> u64 {
    let clock = s.min_clock() + 1;
    let gradient = Values::of(gradient);
    let rows = s.check(0, clock, None, gradient).unwrap().unwrap();
    s.commit(0, clock, &rows, gradient, Some(&mut m.changes));
    clock
}

/// Runs `on_clock` and carries out the record it gives (as the service does
/// after logging it); returns the record.
fn clock(
    s: &mut Shard,
    m: &mut MirrorState,
    clock: u64,
    stopped: bool,
    backlog: &[Duration],
) -> Option<MirrorLogRecord> {
    let record = m.on_clock(s.values(), clock, stopped, backlog, Instant::now());
    if let Some(record) = &record {
        m.apply(record, s).unwrap();
    }
    record
}

/// Forms the next update on link `p` if the link is idle (carrying out the
/// record) and returns the update in flight.
fn in_flight(s: &mut Shard, m: &mut MirrorState, p: usize) -> Option<MirrorUpdate> {
    if let Some(record) = m.form(p, s.values(), Instant::now()) {
        m.apply(&record, s).unwrap();
    }
    m.in_flight(p).cloned()
}

fn contents(update: &MirrorUpdate) -> (Vec<u32>, Vec<f32>) {
    (
        wire::indexes(update, usize::MAX).unwrap(),
        unpack_values(&update.deltas).unwrap(),
    )
}

fn ack(m: &mut MirrorState, p: usize, update: &MirrorUpdate) {
    m.acknowledged(p, (update.epoch, update.seq), Instant::now());
}

const IDLE: [Duration; 2] = [Duration::ZERO; 2];

#[test]
fn sends_significant_updates_and_keeps_the_rest() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    m.start_epoch(1);
    let mut g = [0.0; 8];
    g[0] = 0.5; // 50% of 1: significant
    g[1] = 0.05; // 5%: not yet
    let c = push(&mut s, &mut m, &g);
    clock(&mut s, &mut m, c, false, &IDLE);
    for p in 0..2 {
        let update = in_flight(&mut s, &mut m, p).unwrap();
        assert_eq!(contents(&update), (vec![0], vec![-0.5]));
        assert_eq!(
            (update.datacenter.as_str(), update.epoch, update.seq),
            ("a", 1, 1)
        );
        assert!(m.announcement(p).is_none(), "nothing piles up");
        ack(&mut m, p, &update);
    }
    // The 5% stays accumulated; another 6% makes it significant (11% of 0.89).
    g = [0.0; 8];
    g[1] = 0.06;
    let c = push(&mut s, &mut m, &g);
    clock(&mut s, &mut m, c, false, &IDLE);
    let update = in_flight(&mut s, &mut m, 0).unwrap();
    let (indexes, deltas) = contents(&update);
    assert_eq!((indexes, update.seq), (vec![1], 2));
    assert!((deltas[0] + 0.11).abs() < 1e-6);
    assert_eq!(m.changes.accumulated, [0.0; 8]);
    assert!((m.changes.generated[1] + 0.11).abs() < 1e-6);
}

#[test]
fn a_peer_update_that_shrinks_a_value_makes_what_we_hold_significant() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    m.start_epoch(1);
    let mut g = [0.0; 8];
    g[3] = 0.05; // 5% of 1: held back at 10%
    let c = push(&mut s, &mut m, &g);
    assert!(clock(&mut s, &mut m, c, false, &IDLE).is_none());
    // Only a peer moves element 3 (1 − 0.05 → 0.25): our 0.05 is now 20% of it.
    let update = MirrorUpdate {
        datacenter: "b".into(),
        seq: 1,
        indexes: pack_indexes(&[3]),
        deltas: pack_values(&[-0.7]),
        epoch: 1,
        ..MirrorUpdate::default()
    };
    assert!(m.on_update(&update, &mut s).unwrap());
    assert!(clock(&mut s, &mut m, c + 1, false, &IDLE).is_some());
    let sent = in_flight(&mut s, &mut m, 0).unwrap();
    let (indexes, deltas) = contents(&sent);
    assert_eq!(indexes, [3]);
    assert!((deltas[0] + 0.05).abs() < 1e-6);
}

#[test]
fn shares_what_it_held_back_when_stopped_and_is_then_drained() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    // A gradient of 0.03 (learning rate 1) moves each value 3%.
    let c = push(&mut s, &mut m, &[0.03; 8]);
    assert!(clock(&mut s, &mut m, c, false, &IDLE).is_none());
    assert!(!m.drained());
    // Held back at 10%: a, b and c each end with a third of it.
    clock(&mut s, &mut m, c, true, &IDLE);
    assert!(m.tick().stopped);
    let updates: Vec<MirrorUpdate> = (0..2)
        .map(|p| in_flight(&mut s, &mut m, p).unwrap())
        .collect();
    for update in &updates {
        let (indexes, deltas) = contents(update);
        assert_eq!(indexes, (0..8).collect::<Vec<_>>());
        assert!(deltas.iter().all(|d| (d + 0.01).abs() < 1e-6), "{deltas:?}");
    }
    assert!(s.values().iter().all(|v| (v - 0.99).abs() < 1e-6));
    assert!(m.changes.generated.iter().all(|g| (g + 0.01).abs() < 1e-6));
    assert_eq!(m.changes.accumulated, [0.0; 8]);
    assert!(!m.drained(), "updates are unacknowledged");
    ack(&mut m, 0, &updates[0]);
    assert!(!m.drained(), "one peer has not acknowledged");
    ack(&mut m, 1, &updates[1]);
    assert!(m.drained());
}

#[test]
fn announces_when_updates_pile_up() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    let c = push(&mut s, &mut m, &[0.5; 8]);
    clock(&mut s, &mut m, c, false, &IDLE);
    let first = in_flight(&mut s, &mut m, 0).unwrap();
    assert!(!first.announced);
    // The link to b is stuck: what becomes significant now is announced
    // for the update after the one in flight, and that update says so.
    let c = push(&mut s, &mut m, &[0.5; 8]);
    let stuck = [Duration::from_secs(5), Duration::ZERO];
    clock(&mut s, &mut m, c, false, &stuck);
    let announce = m.announcement(0).unwrap();
    assert_eq!(announce.seq, 2);
    assert_eq!(
        unpack_indexes(&announce.indexes).unwrap(),
        (0..8).collect::<Vec<_>>()
    );
    m.announcement_sent(0, 2, announce.encoded_len(), Instant::now());
    assert!(m.announcement(0).is_none());
    ack(&mut m, 0, &first);
    let second = in_flight(&mut s, &mut m, 0).unwrap();
    assert!(second.announced && second.seq == 2);
}

/// `N` clocks of significant updates for a peer that never acknowledges:
/// the link holds one update in flight and one coalesced queue, never more
/// than the shard's elements; once the peer answers, one update carries
/// everything, and a receiver applies every delta exactly once.
#[test]
fn an_unreachable_peer_costs_at_most_the_shard_not_the_updates() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    let (mut rs, mut receiver) = (shard(), mirror_named("b", &["a", "c"], ASP, 1, 1));
    let mut first = None;
    for i in 0..1000 {
        let mut g = [0.0; 8];
        g[i % 8] = 0.5;
        g[(i + 3) % 8] = -0.25;
        let at = push(&mut s, &mut m, &g);
        clock(&mut s, &mut m, at, false, &IDLE);
        let update = in_flight(&mut s, &mut m, 0).unwrap();
        first.get_or_insert(update.clone());
        assert_eq!(update.seq, 1, "one update in flight until acknowledged");
        assert!(m.backlog_elements(0) <= 2 * 8, "{}", m.backlog_elements(0));
    }
    assert_eq!(
        m.status().peers[0].queued_elements,
        m.backlog_elements(0) as u64
    );
    // The partition heals: the update in flight arrives (twice: a retry),
    // then the coalesced rest.
    let first = first.unwrap();
    assert!(receiver.on_update(&first, &mut rs).unwrap());
    assert!(
        !receiver.on_update(&first, &mut rs).unwrap(),
        "applied twice"
    );
    ack(&mut m, 0, &first);
    // Training stops: what was not yet significant joins the queue too.
    let last = s.min_clock();
    clock(&mut s, &mut m, last, true, &IDLE);
    let rest = in_flight(&mut s, &mut m, 0).unwrap();
    assert_eq!(rest.seq, 2);
    assert!(receiver.on_update(&rest, &mut rs).unwrap());
    ack(&mut m, 0, &rest);
    assert!(in_flight(&mut s, &mut m, 0).is_none());
    // b's model is a's: the initial values plus everything a generated.
    for (i, (r, g)) in rs.values().iter().zip(&m.changes.generated).enumerate() {
        #[allow(clippy::cast_possible_truncation)]
        let expected = 1.0 + *g as f32;
        assert!(
            (r - expected).abs() < 1e-3,
            "element {i}: {r} != {expected}"
        );
    }
}

/// A shard that crashes and restarts from its checkpoint and write-ahead log
/// continues each link where it left off: the update that was in flight is
/// sent again under its old stamp (a receiver that applied it ignores it),
/// later ones continue the seq under the new epoch.
#[test]
fn a_restarted_sender_continues_its_links_and_nothing_is_applied_twice() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    m.start_epoch(10);
    let (mut rs, mut receiver) = (shard(), mirror_named("b", &["a", "c"], ASP, 1, 1));
    // Before the crash: a checkpoint after one update, then a log.
    let c = push(&mut s, &mut m, &[0.5; 8]);
    clock(&mut s, &mut m, c, false, &IDLE);
    let one = in_flight(&mut s, &mut m, 0).unwrap();
    receiver.on_update(&one, &mut rs).unwrap();
    ack(&mut m, 0, &one);
    let (shard_checkpoint, mirror_checkpoint) = (s.checkpoint(), m.checkpoint());
    let mut log = Vec::new();
    let mut g = [0.0; 8];
    g[2] = 0.5;
    let c = push(&mut s, &mut m, &g);
    let queued = m
        .on_clock(s.values(), c, false, &IDLE, Instant::now())
        .unwrap();
    m.apply(&queued, &mut s).unwrap();
    log.push(queued);
    let formed = m.form(0, s.values(), Instant::now()).unwrap();
    m.apply(&formed, &mut s).unwrap();
    log.push(formed);
    let two = m.in_flight(0).cloned().unwrap();
    // b applied update 2, but the acknowledgement was lost with the crash.
    assert!(receiver.on_update(&two, &mut rs).unwrap());

    // Restart: checkpoint, then the log replayed (the push included).
    let (mut s2, mut m2) = (shard(), mirror(ASP, 1, 1));
    s2.restore(&shard_checkpoint).unwrap();
    m2.restore(&mirror_checkpoint).unwrap();
    let rows = s2.check(0, c, None, Values::of(&g)).unwrap().unwrap();
    s2.commit(0, c, &rows, Values::of(&g), Some(&mut m2.changes));
    for record in &log {
        m2.apply(record, &mut s2).unwrap();
    }
    // A crash between writing a checkpoint and emptying the log replays
    // records the checkpoint holds: they change nothing.
    let after = m2.checkpoint();
    let (mut s3, mut m3) = (shard(), mirror(ASP, 1, 1));
    s3.restore(&s2.checkpoint()).unwrap();
    m3.restore(&after).unwrap();
    for record in &log {
        m3.apply(record, &mut s3).unwrap();
    }
    assert_eq!(m3.checkpoint(), after);
    assert_eq!(m2.start_epoch(5), 11, "an epoch above the one restored");
    assert_eq!(m2.changes.generated, m.changes.generated);
    assert_eq!(m2.changes.accumulated, m.changes.accumulated);
    // The update in flight goes again, under its old stamp: b ignores it.
    let again = m2.in_flight(0).cloned().unwrap();
    assert_eq!(again, two);
    assert!(!receiver.on_update(&again, &mut rs).unwrap());
    ack(&mut m2, 0, &again);
    // The link to c had formed nothing: both updates wait in its queue,
    // coalesced, and go as c's first update.
    let (mut cs, mut c_receiver) = (shard(), mirror_named("c", &["a", "b"], ASP, 1, 1));
    let to_c = in_flight(&mut s2, &mut m2, 1).unwrap();
    assert_eq!((to_c.epoch, to_c.seq), (11, 1));
    assert_eq!(
        contents(&to_c).1,
        [-0.5, -0.5, -1.0, -0.5, -0.5, -0.5, -0.5, -0.5]
    );
    // The next update continues the link's numbering in the new epoch.
    let c2 = push(&mut s2, &mut m2, &[0.5; 8]);
    clock(&mut s2, &mut m2, c2, false, &IDLE);
    let three = in_flight(&mut s2, &mut m2, 0).unwrap();
    assert_eq!((three.epoch, three.seq), (11, 3));
    assert!(receiver.on_update(&three, &mut rs).unwrap());
    assert!(c_receiver.on_update(&to_c, &mut cs).unwrap());
    assert_eq!(rs.values(), s2.values());
    assert_eq!(cs.values(), [0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]);
}

/// A sender that lost its state altogether (no checkpoint) starts at seq 1
/// in a new epoch: its receivers take its updates instead of dropping them
/// as duplicates.
#[test]
fn a_new_epoch_starts_the_numbering_over() {
    let (mut rs, mut receiver) = (shard(), mirror_named("b", &["a", "c"], ASP, 1, 1));
    let update = |epoch, seq| MirrorUpdate {
        datacenter: "a".into(),
        seq,
        indexes: pack_indexes(&[0]),
        deltas: pack_values(&[1.0]),
        announced: false,
        round: 0,
        epoch,
        ..MirrorUpdate::default()
    };
    assert!(receiver.on_update(&update(1, 5), &mut rs).unwrap());
    assert!(!receiver.on_update(&update(1, 5), &mut rs).unwrap());
    assert!(receiver.on_update(&update(2, 1), &mut rs).unwrap());
    assert!(
        !receiver.on_update(&update(1, 6), &mut rs).unwrap(),
        "an older epoch"
    );
    assert_eq!(rs.values()[0], 3.0);
}

/// Reads blocked by an announcement of a peer that crashed are released
/// when the peer is heard in a new epoch, or when the announcement expires.
#[test]
fn announcements_of_a_crashed_peer_do_not_block_reads_forever() {
    let (s, mut m) = (shard(), mirror(ASP, 1, 1));
    let t0 = Instant::now();
    let announce = |dc: &str, epoch, seq| Announcement {
        datacenter: dc.into(),
        seq,
        indexes: pack_indexes(&[2, 3]),
        epoch,
    };
    m.refresh(t0);
    m.on_announce(&announce("b", 1, 4), &s, t0).unwrap();
    assert!(m.blocked(&[1]));
    let epoch = m.epoch();
    m.heard("b", 2, t0).unwrap();
    assert!(
        !m.blocked(&[1]),
        "b restarted: its old announcement is void"
    );
    assert!(m.epoch() > epoch, "waiting readers are woken");
    // An announcement of the old epoch arriving late blocks nothing.
    m.on_announce(&announce("b", 1, 5), &s, t0).unwrap();
    assert!(!m.blocked(&[1]));
    // c announces, then goes silent: the announcement expires with the peer
    // timeout (10 s here).
    m.on_announce(&announce("c", 1, 1), &s, t0).unwrap();
    m.refresh(t0 + Duration::from_secs(5));
    assert!(m.blocked(&[1]));
    m.refresh(t0 + Duration::from_secs(11));
    assert!(!m.blocked(&[1]));
}

/// A peer silent for longer than the timeout stops holding the
/// mirror-clock bound; heard again, it counts again, and what it sent
/// during the silence is applied once.
#[test]
fn a_silent_peer_stops_holding_the_bound_until_it_speaks_again() {
    let (mut s, mut m) = (shard(), mirror(ASP, 10, 1));
    let t0 = Instant::now();
    let tick = |dc: &str, mirror_clock| ClockTick {
        datacenter: dc.into(),
        mirror_clock,
        epoch: 1,
        ..ClockTick::default()
    };
    m.refresh(t0);
    for (dc, c) in [("b", 3), ("c", 1)] {
        m.heard(dc, 1, t0).unwrap();
        m.on_tick(&tick(dc, c), &mut s).unwrap();
    }
    assert_eq!(m.read_limit(), 29, "c (mirror clock 1) holds the bound");
    assert_eq!(m.peers_reachable(), 2);
    // b keeps ticking, c is cut off.
    for secs in [4, 8, 12] {
        let now = t0 + Duration::from_secs(secs);
        m.heard("b", 1, now).unwrap();
        m.on_tick(&tick("b", 3 + secs), &mut s).unwrap();
        m.refresh(now);
    }
    assert_eq!(m.peers_reachable(), 1);
    assert!(!m.status().peers[1].reachable);
    assert_eq!(m.read_limit(), (15 + 1 + 1) * 10 - 1, "only b counts");
    // c speaks again: it counts at once (and holds the others back until it
    // catches up); the update it had in flight is applied once.
    let update = MirrorUpdate {
        datacenter: "c".into(),
        seq: 1,
        indexes: pack_indexes(&[0]),
        deltas: pack_values(&[0.5]),
        announced: false,
        round: 0,
        epoch: 1,
        ..MirrorUpdate::default()
    };
    let now = t0 + Duration::from_secs(13);
    assert_eq!(m.heard("c", 1, now).unwrap(), Some(true));
    assert!(m.on_update(&update, &mut s).unwrap());
    assert!(!m.on_update(&update, &mut s).unwrap());
    m.on_tick(&tick("c", 2), &mut s).unwrap();
    assert_eq!(m.peers_reachable(), 2);
    assert_eq!(m.read_limit(), 39);
    assert_eq!(s.values()[0], 1.5);
}

/// A shard done training waits for the peers that have not said they are
/// drained only while one of them is heard: a gone peer never says it.
#[test]
fn only_a_peer_heard_lately_keeps_a_drained_shard_waiting() {
    let (mut s, mut m) = (shard(), mirror(ASP, 10, 1));
    let t0 = Instant::now();
    let limit = Duration::from_secs(5);
    assert!(!m.undrained_heard_within(t0, limit), "never heard");
    m.heard("b", 1, t0).unwrap();
    assert!(m.undrained_heard_within(t0 + limit, limit));
    assert!(
        !m.undrained_heard_within(t0 + limit * 2, limit),
        "b went silent"
    );
    let drained = ClockTick {
        datacenter: "b".into(),
        mirror_clock: 3,
        stopped: true,
        drained: true,
        epoch: 1,
        ..ClockTick::default()
    };
    m.on_tick(&drained, &mut s).unwrap();
    assert!(
        !m.undrained_heard_within(t0, limit),
        "b is drained, c never heard"
    );
}

#[test]
fn barrier_blocks_only_announced_rows_until_their_data_arrives() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    // Elements 2 and 3 are row 1.
    let announce = Announcement {
        datacenter: "b".into(),
        seq: 7,
        indexes: pack_indexes(&[2, 3]),
        epoch: 1,
    };
    m.on_announce(&announce, &s, Instant::now()).unwrap();
    assert!(m.blocked(&[1]));
    assert!(m.blocked(&[0, 1, 2, 3]));
    assert!(!m.blocked(&[0, 2, 3]));
    let update = MirrorUpdate {
        datacenter: "b".into(),
        seq: 7,
        indexes: pack_indexes(&[2, 3]),
        deltas: pack_values(&[0.25, -0.25]),
        announced: true,
        round: 0,
        epoch: 1,
        ..MirrorUpdate::default()
    };
    let epoch = m.epoch();
    assert!(m.on_update(&update, &mut s).unwrap());
    assert!(!m.blocked(&[1]));
    assert!(m.epoch() > epoch);
    assert_eq!(&s.values()[2..4], [1.25, 0.75]);
    // Applied once: a retry changes nothing.
    assert!(!m.on_update(&update, &mut s).unwrap());
    assert_eq!(&s.values()[2..4], [1.25, 0.75]);
    // Data before its announcement: the late announcement blocks nothing.
    let early = MirrorUpdate { seq: 8, ..update };
    m.on_update(&early, &mut s).unwrap();
    m.on_announce(&Announcement { seq: 8, ..announce }, &s, Instant::now())
        .unwrap();
    assert!(!m.blocked(&[1]));
}

#[test]
fn rejects_strangers_and_malformed_updates_without_change() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    let before = s.values().to_vec();
    let mut update = MirrorUpdate {
        datacenter: "z".into(),
        seq: 1,
        indexes: pack_indexes(&[0]),
        deltas: pack_values(&[1.0]),
        announced: false,
        round: 0,
        epoch: 1,
        ..MirrorUpdate::default()
    };
    assert!(matches!(
        m.on_update(&update, &mut s),
        Err(MirrorError::UnknownPeer(_))
    ));
    update.datacenter = "b".into();
    update.indexes = pack_indexes(&[99]);
    assert!(m.on_update(&update, &mut s).is_err());
    update.indexes = vec![1, 2, 3];
    assert!(m.on_update(&update, &mut s).is_err());
    // Indexes in both forms, or a bitmap longer than the shard's 8 elements.
    update.indexes = pack_indexes(&[0]);
    update.index_bitmap = vec![1];
    assert!(m.on_update(&update, &mut s).is_err());
    update.indexes = Vec::new();
    update.index_bitmap = vec![1, 0];
    assert!(m.on_update(&update, &mut s).is_err());
    assert_eq!(s.values(), before);
    // As a bitmap, element 0.
    update.index_bitmap = vec![1];
    assert!(m.on_update(&update, &mut s).unwrap());
    assert_eq!(s.values()[0], before[0] + 1.0);
}

#[test]
fn an_update_covering_most_of_the_shard_carries_its_indexes_as_a_bitmap() {
    let dense = wire::update_message(&[0, 1, 2, 3, 5, 6, 7], &[1.0; 7]);
    assert!(dense.indexes.is_empty());
    assert_eq!(dense.index_bitmap, [0b1110_1111]);
    let sparse = wire::update_message(&[6], &[1.0]);
    assert_eq!(sparse.indexes, [6]);
    assert!(sparse.index_bitmap.is_empty());
    assert_eq!(wire::indexes(&dense, 8).unwrap(), [0, 1, 2, 3, 5, 6, 7]);
    assert_eq!(wire::indexes(&sparse, 8).unwrap(), [6]);
}

#[test]
fn mirror_clock_bound_limits_reads_to_ds_clocks_ahead() {
    let (mut s, mut m) = (shard(), mirror(ASP, 10, 1));
    // Peers at mirror clock 0: reads up to clock 19 (mirror clock 1).
    assert_eq!(m.read_limit(), 19);
    let tick = |dc: &str, mirror_clock, stopped| ClockTick {
        datacenter: dc.into(),
        mirror_clock,
        stopped,
        epoch: 1,
        ..ClockTick::default()
    };
    m.on_tick(&tick("b", 3, false), &mut s).unwrap();
    assert_eq!(m.read_limit(), 19, "c is still at 0");
    m.on_tick(&tick("c", 2, false), &mut s).unwrap();
    assert_eq!(m.read_limit(), 39);
    assert_eq!(m.skew(39), 1);
    // A stopped peer holds nobody back; with none left, nothing does.
    m.on_tick(&tick("c", 2, true), &mut s).unwrap();
    assert_eq!(m.read_limit(), 49);
    m.on_tick(&tick("b", 3, true), &mut s).unwrap();
    assert_eq!(m.read_limit(), u64::MAX);
}

/// What a peer's tick says is up to one and a half round trips old; the
/// bound counts from where the peer may be now, at our pace.
#[test]
fn the_bound_adds_the_mirror_clocks_a_round_trip_and_a_half_takes_at_our_pace() {
    let (mut s, mut m) = (shard(), mirror(ASP, 10, 1));
    let t0 = Instant::now();
    for dc in ["b", "c"] {
        let tick = ClockTick {
            datacenter: dc.into(),
            mirror_clock: 2,
            epoch: 1,
            ..ClockTick::default()
        };
        m.on_tick(&tick, &mut s).unwrap();
    }
    assert_eq!(m.read_limit(), 39, "no pace or round trip known yet");
    // A mirror clock (10 clocks) in 25 ms, a round trip of 100 ms to b and
    // of 40 ms to c: c may have made two since its tick, b six.
    m.on_clock(s.values(), 10, false, &IDLE, t0);
    m.on_clock(s.values(), 20, false, &IDLE, t0 + Duration::from_millis(25));
    m.tick_sent(0, 10, Duration::from_millis(100), t0);
    assert_eq!(m.read_limit(), 39, "c's round trip is not known yet");
    m.tick_sent(1, 10, Duration::from_millis(40), t0);
    assert_eq!(m.read_limit(), (2 + 2 + 1 + 1) * 10 - 1, "c holds it");
    // A mirror clock of 50 ms slows our pace (a moving average) to 31 ms:
    // one mirror clock in c's round trip and a half.
    m.on_clock(s.values(), 30, false, &IDLE, t0 + Duration::from_millis(75));
    assert_eq!(m.read_limit(), (2 + 1 + 1 + 1) * 10 - 1);
    // One of 25 ms: 30 ms. c, still at mirror clock 2, holds reads there
    // however long it stays silent.
    m.on_clock(
        s.values(),
        40,
        false,
        &IDLE,
        t0 + Duration::from_millis(100),
    );
    assert_eq!(m.read_limit(), (2 + 2 + 1 + 1) * 10 - 1);
}

/// A datacenter that met the target trains on until every peer met it too,
/// stopped or fell silent: none is left training alone.
#[test]
fn a_datacenter_that_met_the_target_stops_once_every_peer_has() {
    let (mut s, mut m) = (shard(), mirror(ASP, 10, 1));
    let t0 = Instant::now();
    let tick = |dc: &str, stopped, reached_target| ClockTick {
        datacenter: dc.into(),
        stopped,
        reached_target,
        epoch: 1,
        ..ClockTick::default()
    };
    assert!(!m.may_stop_on_target(), "not met here");
    m.on_tick(&tick("b", false, true), &mut s).unwrap();
    assert!(!m.may_stop_on_target(), "met by b, not here");
    assert!(!m.target_reached(), "c has not met it");
    assert!(m.tick().reached_target, "our ticks say so");
    m.on_tick(&tick("c", false, false), &mut s).unwrap();
    assert!(!m.may_stop_on_target());
    m.on_tick(&tick("c", false, true), &mut s).unwrap();
    assert!(m.may_stop_on_target());

    // A peer that stopped for another reason, or is not heard, holds
    // nobody either.
    let (mut s, mut m) = (shard(), mirror(ASP, 10, 1));
    m.on_tick(&tick("b", true, false), &mut s).unwrap();
    assert!(!m.target_reached(), "c is heard and has not met it");
    m.refresh(t0);
    m.heard("b", 1, t0).unwrap();
    m.refresh(t0 + Duration::from_secs(60));
    assert!(m.may_stop_on_target(), "c has not been heard for a minute");
}

#[test]
fn federated_averaging_averages_each_round() {
    let (mut s, mut m) = (
        shard(),
        mirror(
            Exchange::Rounds {
                round_clocks: 2,
                outer: OuterStep::FED_AVG,
            },
            1,
            1,
        ),
    );
    assert_eq!(m.read_limit(), 1);
    push(&mut s, &mut m, &[0.3; 8]);
    let c = push(&mut s, &mut m, &[0.3; 8]);
    // Our delta after round 1: −0.6 everywhere.
    clock(&mut s, &mut m, c, false, &IDLE);
    assert_eq!(in_flight(&mut s, &mut m, 0).unwrap().round, 1);
    assert_eq!(m.read_limit(), 1, "blocked until the round completes");
    for (dc, delta) in [("b", 0.0), ("c", -0.3)] {
        let update = MirrorUpdate {
            datacenter: dc.into(),
            seq: 1,
            indexes: pack_indexes(&(0..8).collect::<Vec<_>>()),
            deltas: pack_values(&[delta; 8]),
            announced: false,
            round: 1,
            epoch: 1,
            ..MirrorUpdate::default()
        };
        m.on_update(&update, &mut s).unwrap();
    }
    // Base 1 plus the mean of −0.6, 0 and −0.3.
    for v in s.values() {
        assert!((v - 0.7).abs() < 1e-6, "{v}");
    }
    assert_eq!(m.read_limit(), 3);
}

/// Peer `dc`'s delta `delta` on every element, closing `round` (its update `seq`).
fn round_update(dc: &str, seq: u64, round: u64, delta: f32) -> MirrorUpdate {
    MirrorUpdate {
        datacenter: dc.into(),
        seq,
        indexes: pack_indexes(&(0..8).collect::<Vec<_>>()),
        deltas: pack_values(&[delta; 8]),
        announced: false,
        round,
        epoch: 1,
        ..MirrorUpdate::default()
    }
}

#[test]
fn diloco_takes_an_outer_nesterov_step_on_the_averaged_change() {
    let outer = OuterStep {
        learning_rate: 0.5,
        momentum: 0.5,
    };
    let rounds = Exchange::Rounds {
        round_clocks: 2,
        outer,
    };
    let (mut s, mut m) = (shard(), mirror(rounds, 1, 1));
    m.start_epoch(1);
    // Round 1: our change −0.5 (two clocks of gradient 0.25 at rate 1),
    // b's 0, c's −1: mean −0.5. Velocity v = 0.5·0 − 0.5 = −0.5; the model
    // moves from 1 by 0.5·(−0.5 + 0.5·(−0.5)) = −0.375, to 0.625.
    push(&mut s, &mut m, &[0.25; 8]);
    let c = push(&mut s, &mut m, &[0.25; 8]);
    clock(&mut s, &mut m, c, false, &IDLE);
    let sent = in_flight(&mut s, &mut m, 0).unwrap();
    assert_eq!(contents(&sent), ((0..8).collect::<Vec<_>>(), vec![-0.5; 8]));
    for (dc, delta) in [("b", 0.0), ("c", -1.0)] {
        m.on_update(&round_update(dc, 1, 1, delta), &mut s).unwrap();
    }
    assert_eq!(s.values(), [0.625; 8]);
    assert_eq!(m.read_limit(), 3);
    // Round 2: every change −0.5. v = 0.5·(−0.5) − 0.5 = −0.75; the model
    // moves by 0.5·(−0.5 + 0.5·(−0.75)) = −0.4375, to 0.1875 — further than
    // the averaged change alone (federated averaging: to 0.125).
    ack(&mut m, 0, &sent);
    push(&mut s, &mut m, &[0.25; 8]);
    let c = push(&mut s, &mut m, &[0.25; 8]);
    clock(&mut s, &mut m, c, false, &IDLE);
    let sent = in_flight(&mut s, &mut m, 0).unwrap();
    assert_eq!((sent.round, contents(&sent).1), (2, vec![-0.5; 8]));
    for dc in ["b", "c"] {
        m.on_update(&round_update(dc, 2, 2, -0.5), &mut s).unwrap();
    }
    assert_eq!(s.values(), [0.1875; 8]);
    assert_eq!(m.read_limit(), 5);
}

/// Two clocks of gradient 0.25 from worker 0, then our delta goes as the
/// next averaging round.
fn round(s: &mut Shard, m: &mut MirrorState) {
    push(s, m, &[0.25; 8]);
    let c = push(s, m, &[0.25; 8]);
    clock(s, m, c, false, &IDLE);
}

/// A shard restarted mid-round (its checkpoint taken with round 2 sent and
/// b's delta in, c's delta in the log after it) closes the round as the
/// shard that did not crash did, and takes the next round's outer step
/// the same way (the momentum, the open round and what peers sent are
/// restored, not started over).
#[test]
fn a_restarted_shard_closes_its_averaging_rounds_as_before() {
    let rounds = Exchange::Rounds {
        round_clocks: 2,
        outer: OuterStep {
            learning_rate: 0.5,
            momentum: 0.5,
        },
    };
    let (mut s, mut m) = (shard(), mirror(rounds, 1, 1));
    m.start_epoch(1);
    round(&mut s, &mut m);
    for dc in ["b", "c"] {
        m.on_update(&round_update(dc, 1, 1, -1.0), &mut s).unwrap();
    }
    round(&mut s, &mut m);
    m.on_update(&round_update("b", 2, 2, -0.5), &mut s).unwrap();
    let (shard_checkpoint, mirror_checkpoint) = (s.checkpoint(), m.checkpoint());
    let log = m
        .accept_update(&round_update("c", 2, 2, 0.5), &s)
        .unwrap()
        .unwrap();
    m.apply(&log, &mut s).unwrap();
    assert_eq!(m.read_limit(), 5, "round 2 closed");

    let (mut s2, mut m2) = (shard(), mirror(rounds, 1, 1));
    s2.restore(&shard_checkpoint).unwrap();
    m2.restore(&mirror_checkpoint).unwrap();
    assert_eq!(m2.read_limit(), 3, "round 2 open, as checkpointed");
    m2.apply(&log, &mut s2).unwrap();
    assert_eq!(m2.read_limit(), 5, "round 2 closed on replay");
    assert_eq!(s2.values(), s.values());
    assert_eq!(m2.checkpoint(), m.checkpoint());

    for (s, m) in [(&mut s, &mut m), (&mut s2, &mut m2)] {
        round(s, m);
        for dc in ["b", "c"] {
            m.on_update(&round_update(dc, 3, 3, -0.25), s).unwrap();
        }
        assert_eq!(m.read_limit(), 7);
    }
    assert_eq!(s2.values(), s.values());
}

/// Receives the update in flight on link `p` (decoded into `received`),
/// acknowledges it, and returns it.
fn deliver(
    s: &mut Shard,
    m: &mut MirrorState,
    p: usize,
    received: &mut [f64; 8],
) -> Option<MirrorUpdate> {
    let update = in_flight(s, m, p)?;
    let indexes = wire::indexes(&update, usize::MAX).unwrap();
    let deltas = wire::deltas(&update).unwrap();
    assert_eq!(indexes.len(), deltas.len());
    for (i, d) in indexes.into_iter().zip(deltas) {
        received[i as usize] += f64::from(d);
    }
    ack(m, p, &update);
    Some(update)
}

#[test]
fn compact_coding_carries_what_it_rounds_off_and_loses_nothing() {
    for (coding, width) in [(ValueCoding::BFloat16, 2), (ValueCoding::Int8, 1)] {
        let asp = Exchange::Asp {
            selective_barrier: false,
            coding,
        };
        let (mut s, mut m) = (shard(), mirror(asp, 1, 1));
        m.start_epoch(1);
        let mut received = [[0.0f64; 8]; 2];
        let mut carried = 0;
        for step in 0..30u8 {
            // Deltas of very different sizes in one update: the small ones
            // round off (Int8 rounds them to 0) and must be carried.
            let sign = if step % 4 == 3 { -1.0 } else { 1.0 };
            let g: Vec<f32> = (0..8u8)
                .map(|i| sign * 0.3 / f32::from(1u8 << i) * (1.0 + f32::from(step) / 7.0))
                .collect();
            let c = push(&mut s, &mut m, &g);
            clock(&mut s, &mut m, c, false, &IDLE);
            for (p, got) in received.iter_mut().enumerate() {
                if let Some(update) = deliver(&mut s, &mut m, p, got) {
                    let sent = wire::indexes(&update, usize::MAX).unwrap().len();
                    assert_eq!(update.deltas.len(), width * sent, "{coding:?}");
                }
                carried += usize::from(!m.peers[p].outbox.carried.is_empty());
                // Conservation: what the peer got, plus what waits for it
                // (queued, and carried: what was rounded off) and what is
                // still accumulated, is every change made here.
                let outbox = &m.peers[p].outbox;
                for (i, &sent) in got.iter().enumerate() {
                    let index = u32::try_from(i).unwrap();
                    let waiting = outbox.queued.get(index).unwrap_or(0.0)
                        + outbox.carried.get(index).unwrap_or(0.0);
                    let total = sent + f64::from(waiting) + f64::from(m.changes.accumulated[i]);
                    let made = m.changes.generated[i];
                    assert!(
                        (total - made).abs() < 1e-5,
                        "{coding:?} step {step} element {i}: {total} vs {made}"
                    );
                }
            }
        }
        assert!(carried > 0, "{coding:?} rounded nothing off");
        // Stopped: everything left goes out exactly, and each peer has
        // every change.
        let c = s.min_clock();
        clock(&mut s, &mut m, c, true, &IDLE);
        for (p, got) in received.iter_mut().enumerate() {
            while let Some(update) = deliver(&mut s, &mut m, p, got) {
                assert_eq!(update.coding, 0, "the last updates are exact");
            }
            for (i, (g, made)) in got.iter().zip(&m.changes.generated).enumerate() {
                assert!((g - made).abs() < 1e-5, "{coding:?} {i}: {g} vs {made}");
            }
        }
        assert!(m.drained());
    }
}

/// `m` with the `BandwidthBudget` schedule at `threshold` (`function`)
/// and a budget of all of each link's bandwidth, `link_mbps` per peer.
fn budgeted(
    m: &mut MirrorState,
    function: geoml_crds::sync_policy::SignificanceFunction,
    threshold: f64,
    link_mbps: Vec<Option<f64>>,
) {
    m.config.link_mbps = link_mbps;
    let filter = Filter::new(
        &Significance {
            function,
            threshold,
            schedule: geoml_crds::sync_policy::ThresholdSchedule::BandwidthBudget,
            ..Significance::default()
        },
        geoml_crds::sync_policy::WanBudget {
            mbps: None,
            share: 1.0,
        },
        1,
    );
    m.reconfigure(&crate::ps::policy::PolicyChange {
        filter: Some(filter),
        ..Default::default()
    });
}

#[test]
fn a_budgeted_link_sends_the_most_significant_it_can_pay_for_and_holds_the_rest() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    // The link to b may carry 160 B/s and starts with half a second of
    // it, 80 bytes: one call's 64 bytes of framing and two elements of 6.
    // The link to c has no bandwidth, so no budget.
    budgeted(
        &mut m,
        geoml_crds::sync_policy::SignificanceFunction::RelativeChange,
        0.1,
        vec![Some(160.0 * 8.0 / 1e6), None],
    );
    let t0 = Instant::now();
    let mut g = [0.0; 8];
    g[0] = 0.5;
    g[3] = 0.3;
    g[5] = 0.25;
    let c = push(&mut s, &mut m, &g);
    clock(&mut s, &mut m, c, false, &IDLE).unwrap();
    // Significance 1.0, 0.43 and 0.33: b gets the first two, c all three.
    let formed = m.form(0, s.values(), t0).unwrap();
    let Some(crate::pb::mirror::mirror_log_record::Record::Formed(record)) = &formed.record else {
        panic!("not a Formed record: {formed:?}");
    };
    // The held element is in the log record, so a replay holds it too.
    assert_eq!(unpack_indexes(&record.held).unwrap(), vec![5]);
    m.apply(&formed, &mut s).unwrap();
    let to_b = m.in_flight(0).cloned().unwrap();
    assert_eq!(contents(&to_b), (vec![0, 3], vec![-0.5, -0.3]));
    assert_eq!(
        contents(&in_flight(&mut s, &mut m, 1).unwrap()),
        (vec![0, 3, 5], vec![-0.5, -0.3, -0.25])
    );
    // Acknowledged, the update is paid for: b's link owes, and forms
    // nothing until the allowance has room again.
    m.acknowledged(0, (to_b.epoch, to_b.seq), t0);
    assert_eq!(m.form(0, s.values(), t0), None);
    let wait = m.budget_wait(0, t0).unwrap();
    assert!(wait > Duration::ZERO);
    assert_eq!(m.budget_wait(1, t0), None);
    let later = t0 + wait + Duration::from_millis(50);
    let formed = m.form(0, s.values(), later).unwrap();
    m.apply(&formed, &mut s).unwrap();
    assert_eq!(contents(m.in_flight(0).unwrap()), (vec![5], vec![-0.25]));
}

/// Adds what `update` carries to `sent`, per element.
fn add_sent(sent: &mut [f32], update: &MirrorUpdate) {
    let (indexes, deltas) = contents(update);
    for (i, d) in indexes.into_iter().zip(deltas) {
        sent[i as usize] += d;
    }
}

#[test]
fn a_budgeted_link_carries_its_budget_once_settled_and_loses_nothing() {
    // 2000 elements, each moved every clock by a delta of its own size
    // (1e-4 to 0.1): at an absolute threshold of 0.01 Gaia would send
    // about 1 MB/s. The link's budget is 30 kB/s. A clock every 10 ms,
    // an update acknowledged 100 ms after it is formed (the RTT); 30
    // simulated seconds.
    const ROWS: usize = 250;
    const CLOCK: Duration = Duration::from_millis(10);
    const RTT_CLOCKS: u64 = 10;
    let layout = Layout::new(vec![TensorShape {
        name: "w",
        rows: ROWS,
        cols: 8,
    }]);
    let mut s = Shard::new(&layout, 0, 1, 1, Optimizer::Sgd, 1.0, |_, out| {
        out.fill(1.0);
    });
    let elements = ROWS * 8;
    let config = mirror_named("a", &["b"], ASP, 1, 1).config;
    let mut m = MirrorState::new(config, elements, ROWS);
    let budget = 30_000.0;
    budgeted(
        &mut m,
        geoml_crds::sync_policy::SignificanceFunction::AbsoluteChange,
        0.01,
        vec![Some(budget * 8.0 / 1e6)],
    );
    #[allow(clippy::cast_precision_loss)]
    let gradient: Vec<f32> = (0..elements)
        .map(|i| 1e-4 * (1.0 + (i * 7919 % 1000) as f32))
        .collect();
    let t0 = Instant::now();
    let mut sent = vec![0.0f32; elements];
    let mut bytes_per_second = vec![0u64; 30];
    let mut formed_at = None;
    for clock in 1..=3000u64 {
        let now = t0 + CLOCK * u32::try_from(clock).unwrap();
        let c = push(&mut s, &mut m, &gradient);
        assert_eq!(c, clock);
        let queued = m.on_clock(s.values(), c, false, &IDLE, Instant::now());
        if let Some(record) = queued {
            m.apply(&record, &mut s).unwrap();
        }
        if let Some(at) = formed_at
            && clock >= at + RTT_CLOCKS
        {
            let update = m.in_flight(0).cloned().unwrap();
            add_sent(&mut sent, &update);
            bytes_per_second[usize::try_from(clock / 100).unwrap().min(29)] +=
                update.encoded_len() as u64 + super::budget::CALL_BYTES;
            m.acknowledged(0, (update.epoch, update.seq), now);
            formed_at = None;
        }
        if formed_at.is_none()
            && let Some(record) = m.form(0, s.values(), now)
        {
            m.apply(&record, &mut s).unwrap();
            formed_at = Some(clock);
        }
    }
    // Settled after the first 5 s: every second within ±15% of the budget.
    for (second, &bytes) in bytes_per_second.iter().enumerate().skip(5).take(24) {
        #[allow(clippy::cast_precision_loss)]
        let rate = bytes as f64;
        assert!(
            (rate / budget - 1.0).abs() <= 0.15,
            "second {second}: {rate} B/s against {budget}: {bytes_per_second:?}"
        );
    }
    // Stopped, what was held back goes too: b has every change.
    let queued = m.on_clock(s.values(), 3000, true, &IDLE, Instant::now());
    if let Some(record) = queued {
        m.apply(&record, &mut s).unwrap();
    }
    if let Some(update) = m.in_flight(0).cloned() {
        add_sent(&mut sent, &update);
        m.acknowledged(0, (update.epoch, update.seq), t0);
    }
    while let Some(record) = m.form(0, s.values(), t0) {
        m.apply(&record, &mut s).unwrap();
        let update = m.in_flight(0).cloned().unwrap();
        add_sent(&mut sent, &update);
        m.acknowledged(0, (update.epoch, update.seq), t0);
    }
    for (i, (&d, &v)) in sent.iter().zip(s.values()).enumerate() {
        assert!(
            (d - (v - 1.0)).abs() < 1e-3,
            "element {i}: sent {d}, changed {}",
            v - 1.0
        );
    }
}
