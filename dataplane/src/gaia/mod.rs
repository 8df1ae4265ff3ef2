//! Gaia's Approximate Synchronous Parallel between datacenters, and federated
//! averaging: shard i of every datacenter mirrors shard i of the others.
//!
//! - [`significance`]: which accumulated updates are worth the WAN, and the
//!   threshold schedules.
//! - [`state`]: accumulators, the selective barrier, mirror clocks and
//!   averaging rounds, as pure state.
//! - [`service`]: the `Mirror` gRPC service and the links to the peers.

pub mod service;
pub mod significance;
pub mod state;
