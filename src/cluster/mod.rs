//! Several replicas that act as one (`[cluster]`): a shared directory of which replica holds
//! which tunnel (`store`, etcd or Redis), and an authenticated private link between replicas that opens
//! a channel on the owner's side for a visitor who landed elsewhere (`peer`). `directory` is the
//! cluster's answer to "where are this host's members", `owner` the owner's answer to a peer
//! dial, `select` the spread of a pool over replicas, `eject` which replicas cannot be reached,
//! `drift` the settings replicas must agree on, `fence` when a replica cut from the store takes
//! itself out of service, `listing` other replicas as they answer while the store is down,
//! `node` starts and stops it all. Nothing here
//! runs without a `[cluster]` section.

// Without a store backend there is no cluster to run: only the pure pieces are built, for tests.
#![cfg_attr(not(feature = "store"), allow(dead_code))]

#[cfg(feature = "store")]
mod directory;
pub(crate) mod drift;
pub(crate) mod eject;
pub(crate) mod fence;
pub(crate) mod listing;
#[cfg(feature = "store")]
mod node;
mod owner;
pub mod peer;
pub(crate) mod select;
pub(crate) mod store;

#[cfg(feature = "store")]
pub(crate) use node::Cluster;
#[cfg(feature = "store")]
pub use node::ClusterError;

/// What one other replica answered to a kill (`DELETE /tunnels/{host}`): how many connections it
/// closed, or why not.
#[derive(Debug)]
pub(crate) struct Killed {
    pub(crate) replica: String,
    pub(crate) result: Result<u32, String>,
}
