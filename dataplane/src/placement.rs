//! Where a role sits in a job: from the manifest and its datacenter's
//! topology file, a shard's or worker's global place, the counts and
//! consistency model it works with, and its mirrors.
//!
//! Two shapes: in the *global* modes (LAN, naive WAN BSP/SSP, centralized)
//! the shards of every datacenter form one parameter server that every
//! worker pushes to; in the *per-datacenter* modes (Gaia's ASP, federated
//! averaging, DiLoCo, isolated) each datacenter has a full model over its own shards,
//! and shard i mirrors shard i of the other datacenters.

use geoml_crds::Topology;
use geoml_crds::datacenter::link_bandwidth_mbps;
use geoml_crds::sync_policy::InterDatacenterModel;

use crate::gaia::significance::Filter;
use crate::gaia::state::{Exchange, MirrorConfig};
use crate::ps::shard::Consistency;
use crate::worker::EvalSchedule;
use geoml_crds::manifest::ResolvedJob;

/// A manifest and topology that do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// The topology names a datacenter the job does not use.
    #[error("topology: datacenter {0:?} is not in the TrainingJob's spec.datacenters")]
    UnknownDatacenter(String),
    /// The topology lists another number of shards than the job implies.
    #[error(
        "topology: parameterServers lists {got} shards, the job gives datacenter {datacenter:?} {expected}"
    )]
    ShardCount {
        /// The datacenter.
        datacenter: String,
        /// Shards the job implies.
        expected: usize,
        /// Shards listed.
        got: usize,
    },
    /// Mirrored datacenters need the same number of shards.
    #[error(
        "spec.datacenters: mode {mode} mirrors shard i of every datacenter, so every datacenter needs the same number of parameterServers"
    )]
    UnevenShards {
        /// The mode.
        mode: &'static str,
    },
    /// A mirror address is missing.
    #[error("topology: mirrors.{peer} lists no address for shard {shard}")]
    MissingMirror {
        /// The peer datacenter.
        peer: String,
        /// The shard.
        shard: u32,
    },
    /// An index is out of range.
    #[error("{what} {index} is not below the datacenter's {count}")]
    Index {
        /// `--shard` or `--index`.
        what: &'static str,
        /// The index given.
        index: u32,
        /// How many there are.
        count: usize,
    },
}

/// A datacenter's place in a job.
#[derive(Clone, Debug)]
pub struct RolePlace {
    /// The datacenter.
    pub datacenter: String,
    /// Global index of the datacenter's first shard (0 per datacenter).
    pub shard_offset: u32,
    /// Shards the datacenter's workers push to.
    pub shards: u32,
    /// The datacenter's own shards.
    pub own_shards: u32,
    /// Workers that push to the datacenter's shards.
    pub workers: usize,
    /// The datacenter's own workers.
    pub own_workers: usize,
    /// Global index of the datacenter's first worker (for data partitions;
    /// for worker numbering too in the global modes).
    pub worker_offset: usize,
    /// Workers in the whole job.
    pub total_workers: usize,
    /// The datacenter's position among the job's datacenters.
    pub index: usize,
    /// Datacenters that take turns to evaluate: all of them with mirrors,
    /// which tell the workers when one met the job's target, and a target
    /// to meet; otherwise 1 (each evaluates at every chance).
    pub eval_turns: usize,
    /// Whether the datacenters form one parameter server.
    pub global: bool,
    /// Consistency among the workers a shard serves.
    pub consistency: Consistency,
    /// What the shards exchange with their mirrors, if anything.
    pub exchange: Option<MirrorConfig>,
    /// Addresses of the shards the workers push to, in shard order.
    pub parameter_servers: Vec<String>,
}

/// What datacenter `here` of `job` exchanges with its mirrors, if anything.
fn mirror_config(
    job: &ResolvedJob<'_>,
    here: usize,
) -> Result<Option<MirrorConfig>, PlacementError> {
    let datacenters = &job.plan.datacenters;
    let numbers = &job.plan.policy;
    let policy = &job.sync_policy.spec;
    let model = policy.inter_datacenter.model;
    let dc = &datacenters[here];
    let exchange = match (model, policy.outer_step()) {
        (InterDatacenterModel::Asp, _) => Exchange::Asp {
            selective_barrier: policy.selective_barrier,
            coding: policy.value_coding,
        },
        (_, Some(outer)) => Exchange::Rounds {
            round_clocks: numbers.round_clocks,
            outer,
        },
        _ => return Ok(None),
    };
    if datacenters.len() < 2 {
        return Ok(None);
    }
    if datacenters.iter().any(|d| d.shards != dc.shards) {
        return Err(PlacementError::UnevenShards {
            mode: geoml_crds::mode::Mode::from(model).name(),
        });
    }
    // The Datacenters are in the job's order, as the plan's are.
    let bandwidth = |d: usize| {
        job.datacenters
            .get(d)
            .and_then(|d| d.spec.wan.as_ref())
            .map(|w| w.bandwidth_mbps)
    };
    Ok(Some(MirrorConfig {
        datacenter: dc.name.clone(),
        peers: datacenters
            .iter()
            .filter(|d| d.name != dc.name)
            .map(|d| d.name.clone())
            .collect(),
        exchange,
        period: numbers.mirror_clock_period,
        bound: numbers.mirror_clock_bound,
        filter: Filter::new(
            &policy.significance,
            policy.wan_budget(),
            numbers.decay_clocks,
        ),
        link_mbps: (0..datacenters.len())
            .filter(|&d| d != here)
            .map(|d| link_bandwidth_mbps(bandwidth(here), bandwidth(d)))
            .collect(),
        shards: dc.shards,
        peer_timeout: Some(std::time::Duration::from_secs(numbers.peer_timeout_seconds)),
    }))
}

impl RolePlace {
    /// The place of `topology.datacenter` in `job`.
    pub fn new(job: &ResolvedJob<'_>, topology: &Topology) -> Result<Self, PlacementError> {
        let plan = &job.plan;
        let policy = &job.sync_policy.spec;
        let model = policy.inter_datacenter.model;
        let here = plan
            .datacenters
            .iter()
            .position(|d| d.name == topology.datacenter)
            .ok_or_else(|| PlacementError::UnknownDatacenter(topology.datacenter.clone()))?;
        let dc = &plan.datacenters[here];
        let global = model.is_global();
        let before = &plan.datacenters[..here];
        let shard_offset: usize = before.iter().map(|d| d.shards).sum();
        let worker_offset: usize = before.iter().map(|d| d.workers).sum();
        let shards = if global {
            plan.total_shards()
        } else {
            dc.shards
        };
        if topology.parameter_servers.len() != shards {
            return Err(PlacementError::ShardCount {
                datacenter: dc.name.clone(),
                expected: shards,
                got: topology.parameter_servers.len(),
            });
        }
        let consistency = match model {
            InterDatacenterModel::Bsp => Consistency::Bsp,
            InterDatacenterModel::Ssp => Consistency::Ssp(plan.policy.inter_staleness),
            _ => Consistency::new(policy.intra_datacenter.model, plan.policy.intra_staleness),
        };
        let exchange = mirror_config(job, here)?;
        Ok(Self {
            datacenter: dc.name.clone(),
            shard_offset: u32::try_from(if global { shard_offset } else { 0 }).unwrap_or(0),
            shards: u32::try_from(shards).unwrap_or(u32::MAX),
            own_shards: u32::try_from(dc.shards).unwrap_or(u32::MAX),
            workers: if global {
                plan.total_workers()
            } else {
                dc.workers
            },
            own_workers: dc.workers,
            worker_offset,
            total_workers: plan.total_workers(),
            index: here,
            eval_turns: if exchange.is_some() && job.job.spec.stopping.target_metric.is_some() {
                plan.datacenters.len()
            } else {
                1
            },
            global,
            consistency,
            exchange,
            parameter_servers: topology.parameter_servers.clone(),
        })
    }

    /// The global shard index of the datacenter's shard `shard`.
    pub fn shard(&self, shard: u32) -> Result<u32, PlacementError> {
        if shard >= self.own_shards {
            return Err(PlacementError::Index {
                what: "--shard",
                index: shard,
                count: self.own_shards as usize,
            });
        }
        Ok(self.shard_offset + shard)
    }

    /// When the datacenter's evaluating worker evaluates, given the clocks
    /// between evaluations.
    #[must_use]
    pub fn eval_schedule(&self, every: u64) -> EvalSchedule {
        let to_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        EvalSchedule {
            every,
            turn: to_u64(self.index % self.eval_turns),
            turns: to_u64(self.eval_turns),
        }
    }

    /// The mirror addresses of the datacenter's shard `shard`, in peer order.
    pub fn mirrors(&self, topology: &Topology, shard: u32) -> Result<Vec<String>, PlacementError> {
        let Some(exchange) = &self.exchange else {
            return Ok(Vec::new());
        };
        exchange
            .peers
            .iter()
            .map(|peer| {
                topology
                    .mirrors
                    .get(peer)
                    .and_then(|a| a.get(shard as usize))
                    .cloned()
                    .ok_or_else(|| PlacementError::MissingMirror {
                        peer: peer.clone(),
                        shard,
                    })
            })
            .collect()
    }

    /// The indexes, among the workers of its shards, of the datacenter's own
    /// workers: in the global modes the shards also serve other
    /// datacenters' workers, which reach them over the WAN.
    #[must_use]
    pub fn local_workers(&self) -> std::ops::Range<u32> {
        let start = if self.global { self.worker_offset } else { 0 };
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        to_u32(start)..to_u32(start + self.own_workers)
    }

    /// For the datacenter's worker `index`: its index among the workers of
    /// its shards, and its index among all workers (its data partition).
    pub fn worker(&self, index: u32) -> Result<(u32, usize), PlacementError> {
        if index as usize >= self.own_workers {
            return Err(PlacementError::Index {
                what: "--index",
                index,
                count: self.own_workers,
            });
        }
        let global = self.worker_offset + index as usize;
        let local = if self.global { global } else { index as usize };
        Ok((u32::try_from(local).unwrap_or(u32::MAX), global))
    }
}
