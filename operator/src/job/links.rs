//! Sync traffic per WAN link: the shards' per-peer samples summed into the
//! job's `status.links`, priced with the sender's `wan.egressCostPerGiB`,
//! and what the mirror clock measured published as the Datacenters'
//! `status.peers`.

use geoml_crds::Datacenter;
use geoml_crds::datacenter::PeerLinkStatus;
use geoml_crds::training_job::LinkTraffic;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::progress::ShardProgress;
use crate::Context;

/// Field manager of `Datacenter.status.peers`, apart from the Datacenter
/// controller's conditions so that neither apply removes the other's fields.
const PEERS_MANAGER: &str = "geoml-operator-links";

const GIB: f64 = 1_073_741_824.0;

/// The links from datacenter `from` (whose egress costs `price` per GiB),
/// summed over its shards: bytes add up, RTT is the shards' mean, and
/// throughput adds up over the shards' connections.
pub(super) fn aggregate(
    from: &str,
    price: Option<f64>,
    shards: &[ShardProgress],
) -> Vec<LinkTraffic> {
    let mut peers: Vec<&String> = shards.iter().flat_map(|s| s.links.keys()).collect();
    peers.sort_unstable();
    peers.dedup();
    peers
        .into_iter()
        .map(|to| {
            let samples: Vec<_> = shards.iter().filter_map(|s| s.links.get(to)).collect();
            let delivered: f64 = samples.iter().map(|l| l.delivered_bytes).sum();
            let rtts: Vec<f64> = samples.iter().filter_map(|l| l.rtt_seconds).collect();
            let throughputs: Vec<f64> = samples.iter().filter_map(|l| l.throughput).collect();
            // A handful of shards: the count fits an f64 exactly; byte
            // counts are whole numbers.
            #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
            LinkTraffic {
                from: from.to_owned(),
                to: to.clone(),
                sent_bytes: samples.iter().map(|l| l.sent_bytes).sum::<f64>() as i64,
                delivered_bytes: delivered as i64,
                egress_cost: price.map(|p| delivered / GIB * p),
                rtt_seconds: (!rtts.is_empty())
                    .then(|| rtts.iter().sum::<f64>() / rtts.len() as f64),
                throughput_bytes_per_second: (!throughputs.is_empty())
                    .then(|| throughputs.iter().sum()),
            }
        })
        .collect()
}

/// The cost of every priced link; None when no link is priced.
pub(super) fn total_cost(links: &[LinkTraffic]) -> Option<f64> {
    let priced: Vec<f64> = links.iter().filter_map(|l| l.egress_cost).collect();
    (!priced.is_empty()).then(|| priced.iter().sum())
}

/// Writes each sending Datacenter's `status.peers`: the RTT and throughput
/// its links last measured. A failure is logged: the job's own status holds
/// the same figures.
pub(super) async fn publish_peers(ctx: &Context, links: &[LinkTraffic], now: &Time) {
    let mut senders: Vec<&str> = links.iter().map(|l| l.from.as_str()).collect();
    senders.sort_unstable();
    senders.dedup();
    let api = Api::<Datacenter>::all(ctx.client.clone());
    for from in senders {
        let peers: Vec<PeerLinkStatus> = links
            .iter()
            .filter(|l| l.from == from)
            .filter_map(|l| {
                Some(PeerLinkStatus {
                    datacenter: l.to.clone(),
                    rtt_ms: l.rtt_seconds? * 1000.0,
                    throughput_mbps: l.throughput_bytes_per_second? * 8.0 / 1e6,
                    measured_at: Some(now.clone()),
                })
            })
            .collect();
        if peers.is_empty() {
            continue;
        }
        let patch = json!({
            "apiVersion": "geoml.io/v1alpha1",
            "kind": "Datacenter",
            "status": { "peers": peers },
        });
        let params = PatchParams::apply(PEERS_MANAGER).force();
        if let Err(error) = api.patch_status(from, &params, &Patch::Apply(patch)).await {
            tracing::warn!(%error, datacenter = from, "writing the Datacenter's peers");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::progress::LinkSample;

    fn shard(peer: &str, sent: f64, delivered: f64, rtt: f64, throughput: f64) -> ShardProgress {
        let mut s = ShardProgress::default();
        s.links.insert(
            peer.to_owned(),
            LinkSample {
                sent_bytes: sent,
                delivered_bytes: delivered,
                rtt_seconds: Some(rtt),
                throughput: Some(throughput),
            },
        );
        s
    }

    #[test]
    fn shards_add_up_per_link_and_delivered_bytes_are_priced() {
        let shards = [
            shard("b", 2.0 * GIB, GIB, 0.1, 100.0),
            shard("b", GIB, GIB, 0.3, 50.0),
        ];
        let links = aggregate("a", Some(0.09), &shards);
        assert_eq!(links.len(), 1);
        let l = &links[0];
        assert_eq!((l.from.as_str(), l.to.as_str()), ("a", "b"));
        assert_eq!(l.sent_bytes, 3 * (1 << 30));
        assert_eq!(l.delivered_bytes, 2 * (1 << 30));
        assert!((l.egress_cost.unwrap() - 0.18).abs() < 1e-9);
        assert!((l.rtt_seconds.unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(l.throughput_bytes_per_second, Some(150.0));
        assert!((total_cost(&links).unwrap() - 0.18).abs() < 1e-9);
        assert_eq!(total_cost(&aggregate("a", None, &shards)), None);
    }
}
