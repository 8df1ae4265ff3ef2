//! Names of the Prometheus series `geoml` pods serve that the operator reads.
//!
//! The runtime registers its metrics under these names and the operator
//! parses them from a parameter server's `/metrics`, so a rename changes both.
//! Every series of a parameter server carries the labels [`DATACENTER_LABEL`]
//! and [`SHARD_LABEL`].

/// Label naming the datacenter of the parameter server that serves a series.
pub const DATACENTER_LABEL: &str = "datacenter";

/// Label naming the shard (its index within its datacenter's parameter
/// server) that serves a series.
pub const SHARD_LABEL: &str = "shard";

/// Gauge: the lowest clock over the workers a shard serves (iterations every
/// one of them has completed).
pub const PS_CLOCK: &str = "geoml_ps_clock";

/// Gauge: the latest evaluation metric (accuracy or RMSE) the evaluating
/// worker reported to the shard.
pub const PS_METRIC: &str = "geoml_ps_metric";

/// Gauge: the clock of the evaluation in [`PS_METRIC`]; 0 until the shard
/// hears one (a restarted shard until the next evaluation).
pub const PS_METRIC_CLOCK: &str = "geoml_ps_metric_clock";

/// Counter: bytes of mirror messages (updates, announcements, clock ticks)
/// a shard sent to its mirrors in other datacenters, summed over peers. Only
/// the modes with mirrors (Gaia's ASP, federated averaging) send any.
pub const MIRROR_SENT_BYTES: &str = "geoml_mirror_sent_bytes_total";

/// Counter: request and response bytes a shard exchanged with workers of
/// other datacenters: the WAN traffic of the naive WAN modes (inter-datacenter
/// BSP and SSP), where every worker pushes to and pulls from every shard.
/// Zero in the modes where workers only reach their own datacenter's shards.
pub const PS_WAN_BYTES: &str = "geoml_ps_wan_bytes_total";

/// Label naming the peer datacenter of a per-link series.
pub const PEER_LABEL: &str = "peer";

/// Counter: bytes of mirror messages a shard handed to the link to each
/// peer datacenter ([`PEER_LABEL`]).
pub const MIRROR_LINK_SENT_BYTES: &str = "geoml_mirror_link_sent_bytes_total";

/// Counter: of [`MIRROR_LINK_SENT_BYTES`], the bytes the peer acknowledged:
/// what crossed the link. Sync traffic and egress cost count these.
pub const MIRROR_LINK_DELIVERED_BYTES: &str = "geoml_mirror_link_delivered_bytes_total";

/// Gauge: round-trip time to each peer, measured by the mirror clock's ticks.
pub const MIRROR_RTT: &str = "geoml_mirror_rtt_seconds";

/// Gauge: throughput acknowledged updates showed on the link to each peer.
pub const MIRROR_THROUGHPUT: &str = "geoml_mirror_throughput_bytes_per_second";

/// Gauge: a shard's current significance threshold (Gaia's ASP); follows
/// live SyncPolicy changes.
pub const MIRROR_THRESHOLD: &str = "geoml_mirror_threshold";

/// Counter: parameter elements changed by a datacenter's workers, as a
/// shard accumulates them for its mirrors (Gaia's ASP).
pub const MIRROR_ELEMENTS_UPDATED: &str = "geoml_mirror_elements_updated_total";

/// Counter: of [`MIRROR_ELEMENTS_UPDATED`], the elements sent to the mirrors
/// (the significant ones); the ratio is the fraction of updates sent.
pub const MIRROR_ELEMENTS_SENT: &str = "geoml_mirror_elements_sent_total";
/// Gauge: peers the mirror-clock bound counts (heard from within
/// `interDatacenter.peerTimeoutSeconds` and still training).
pub const MIRROR_PEERS_REACHABLE: &str = "geoml_mirror_peers_reachable";
/// Gauge per peer ([`PEER_LABEL`]): 1 while the peer was heard from within
/// the peer timeout, 0 once it went silent for longer.
pub const MIRROR_PEER_REACHABLE: &str = "geoml_mirror_peer_reachable";
/// Gauge per peer ([`PEER_LABEL`]): elements waiting for the peer, queued
/// behind or in the update in flight (coalesced per element, so bounded by
/// twice the shard's size during a partition).
pub const MIRROR_PEER_QUEUED_ELEMENTS: &str = "geoml_mirror_peer_queued_elements";

/// The series the operator reads for a job's progress: from a running
/// parameter server's `/metrics`, and from a finished one's termination
/// message, which holds their final values in the same text format.
pub const PROGRESS: [&str; 11] = [
    PS_CLOCK,
    PS_METRIC,
    PS_METRIC_CLOCK,
    MIRROR_SENT_BYTES,
    PS_WAN_BYTES,
    MIRROR_ELEMENTS_UPDATED,
    MIRROR_ELEMENTS_SENT,
    MIRROR_LINK_SENT_BYTES,
    MIRROR_LINK_DELIVERED_BYTES,
    MIRROR_RTT,
    MIRROR_THROUGHPUT,
];
