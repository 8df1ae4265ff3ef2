//! Gaia's Approximate Synchronous Parallel between datacenters, and federated
//! averaging: shard i of every datacenter mirrors shard i of the others.
//!
//! - [`significance`]: which accumulated updates are worth the WAN, and the
//!   threshold schedules.
//! - [`budget`]: what each WAN link may carry under the bandwidth-budget
//!   schedule.
//! - [`state`]: accumulators, the selective barrier, mirror clocks and
//!   averaging rounds, as pure state.
//! - [`service`]: the `Mirror` gRPC service and the links to the peers.

pub mod budget;
pub mod service;
pub mod significance;
pub mod state;
