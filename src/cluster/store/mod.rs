//! The cluster directory in a shared store (etcd, or Redis/Valkey): this replica's routes
//! published under its lease, and a full in-memory copy of everyone's, fed by the store's
//! change feed (SCALEOUT §3).
//!
//! - `entry`: keys and values, and the checks a value read back must pass (pure);
//! - `cache`: the reducer that applies the store's events to the in-memory copy (pure);
//! - `lease`: the lease state machine, events to actions (pure);
//! - `feed`: the Redis layout and its change feed: keys, stream entries, stream ids (pure);
//! - `local`: this replica's routes, read from the tunnel registry;
//! - `marker`: the hosts waiting to be published;
//! - `state`: the state the backends fill and [`Lookup`] reads, shared by both backends;
//! - `backend`: [`Store`], which starts the backend `[cluster]` names;
//! - `keepalive`: the lease task, driving `lease` through a backend's lease operations;
//! - `publish`: the publisher's loop (new leases, dirty hosts), through a backend's writes;
//! - `etcd`, `redis`: the shells that do the I/O: lease keepalive, publisher, watcher
//!   (features `etcd`, `redis`).
//!
//! Routing reads the copy and never waits on the store; the registry only marks hosts dirty.

// Without a store backend, the pure pieces have no caller outside their tests.
#![cfg_attr(not(feature = "store"), allow(dead_code))]

#[cfg(feature = "store")]
mod backend;
mod cache;
mod entry;
#[cfg(feature = "etcd")]
mod etcd;
pub(crate) mod feed;
#[cfg(feature = "store")]
mod keepalive;
mod lease;
mod local;
#[cfg(feature = "store")]
mod marker;
#[cfg(feature = "store")]
mod publish;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "store")]
mod state;

#[cfg(feature = "store")]
pub use backend::Store;
pub use cache::Snapshot;
pub(crate) use entry::{decode_replica, decode_route, encode_replica};
pub use entry::{encode_route, EntryError, Keys, ReplicaEntry, ReplicaId, ReplicaState, RouteEntry};
pub use local::LocalRoutes;
#[cfg(feature = "store")]
pub use marker::Marker;
#[cfg(feature = "store")]
pub use state::{Lookup, StoreError};
