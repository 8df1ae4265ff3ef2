//! Unit tests of [`super::MirrorState`].

#![allow(clippy::float_cmp)] // small exact sums

use geoml_crds::sync_policy::Significance;
use geoml_crds::training_job::Optimizer;

use geoml_proto::rows::{pack_indexes, pack_values, unpack_indexes, unpack_values};

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
    let config = MirrorConfig {
        datacenter: "a".into(),
        peers: vec!["b".into(), "c".into()],
        exchange,
        period,
        bound,
        filter: Filter::new(
            &Significance {
                threshold: 0.1,
                ..Significance::default()
            },
            None,
            1,
        ),
    };
    MirrorState::new(config, 8, 4)
}

const ASP: Exchange = Exchange::Asp {
    selective_barrier: true,
};

/// Worker 0 pushes `gradient` as its next clock.
fn push(s: &mut Shard, m: &mut MirrorState, gradient: &[f32]) -> u64 {
    let clock = s.min_clock() + 1;
    let rows = s.check(0, clock, None, gradient).unwrap().unwrap();
    s.commit(0, clock, &rows, gradient, Some(&mut m.changes));
    clock
}

fn sent(out: &Outgoing) -> (Vec<u32>, Vec<f32>) {
    let update = out.update.as_ref().unwrap();
    (
        unpack_indexes(&update.indexes).unwrap(),
        unpack_values(&update.deltas).unwrap(),
    )
}

#[test]
fn sends_significant_updates_and_keeps_the_rest() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    let mut g = [0.0; 8];
    g[0] = 0.5; // 50% of 1: significant
    g[1] = 0.05; // 5%: not yet
    let clock = push(&mut s, &mut m, &g);
    let out = m.on_clock(s.values(), clock, false, &[Duration::ZERO; 2]);
    assert_eq!(sent(&out), (vec![0], vec![-0.5]));
    assert!(out.announce.is_none(), "nothing piles up");
    // The 5% stays accumulated; another 6% makes it significant (11% of 0.89).
    g = [0.0; 8];
    g[1] = 0.06;
    let clock = push(&mut s, &mut m, &g);
    let out = m.on_clock(s.values(), clock, false, &[Duration::ZERO; 2]);
    let (indexes, deltas) = sent(&out);
    assert_eq!(indexes, [1]);
    assert!((deltas[0] + 0.11).abs() < 1e-6);
    assert_eq!(m.changes.accumulated, [0.0; 8]);
    assert!((m.changes.generated[1] + 0.11).abs() < 1e-6);
}

#[test]
fn flushes_everything_when_stopped_and_is_then_drained() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    let clock = push(&mut s, &mut m, &[0.01; 8]);
    let out = m.on_clock(s.values(), clock, false, &[Duration::ZERO; 2]);
    assert!(out.update.is_none());
    assert!(!m.drained(0));
    let out = m.on_clock(s.values(), clock, true, &[Duration::ZERO; 2]);
    assert_eq!(sent(&out).0.len(), 8);
    assert!(out.tick.unwrap().stopped);
    assert!(!m.drained(1), "an update is unacknowledged");
    assert!(m.drained(0));
}

#[test]
fn announces_when_updates_pile_up() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    let clock = push(&mut s, &mut m, &[0.5; 8]);
    let stuck = [Duration::from_secs(5), Duration::ZERO];
    let out = m.on_clock(s.values(), clock, false, &stuck);
    let announce = out.announce.unwrap();
    assert_eq!(announce.indexes, out.update.unwrap().indexes);
}

#[test]
fn barrier_blocks_only_announced_rows_until_their_data_arrives() {
    let (mut s, mut m) = (shard(), mirror(ASP, 1, 1));
    // Elements 2 and 3 are row 1.
    let announce = Announcement {
        datacenter: "b".into(),
        seq: 7,
        indexes: pack_indexes(&[2, 3]),
    };
    m.on_announce(&announce, &s).unwrap();
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
    m.on_announce(&Announcement { seq: 8, ..announce }, &s)
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
    assert_eq!(s.values(), before);
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
        drained: false,
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

#[test]
fn federated_averaging_averages_each_round() {
    let (mut s, mut m) = (shard(), mirror(Exchange::FedAvg { round_clocks: 2 }, 1, 1));
    assert_eq!(m.read_limit(), 1);
    push(&mut s, &mut m, &[0.3; 8]);
    let clock = push(&mut s, &mut m, &[0.3; 8]);
    // Our delta after round 1: −0.6 everywhere.
    let out = m.on_clock(s.values(), clock, false, &[Duration::ZERO; 2]);
    assert_eq!(out.update.as_ref().unwrap().round, 1);
    assert_eq!(m.read_limit(), 1, "blocked until the round completes");
    for (dc, delta) in [("b", 0.0), ("c", -0.3)] {
        let update = MirrorUpdate {
            datacenter: dc.into(),
            seq: 1,
            indexes: pack_indexes(&(0..8).collect::<Vec<_>>()),
            deltas: pack_values(&[delta; 8]),
            announced: false,
            round: 1,
        };
        m.on_update(&update, &mut s).unwrap();
    }
    // Base 1 plus the mean of −0.6, 0 and −0.3.
    for v in s.values() {
        assert!((v - 0.7).abs() < 1e-6, "{v}");
    }
    assert_eq!(m.read_limit(), 3);
}
