//! The cluster directory in a shared store (etcd): this replica's routes published under its
//! lease, and a full in-memory copy of everyone's, fed by a watch (SCALEOUT §3).
//!
//! - `entry`: keys and values, and the checks a value read back must pass (pure);
//! - `cache`: the reducer that applies the store's events to the in-memory copy (pure);
//! - `lease`: the lease state machine, events to actions (pure);
//! - `local`: this replica's routes, read from the tunnel registry;
//! - `etcd`: the shell that does the I/O: lease keepalive, publisher, watcher (feature `etcd`).
//!
//! Routing reads the copy and never waits on the store; the registry only marks hosts dirty.

// Without a store backend, the pure pieces have no caller outside their tests.
#![cfg_attr(not(feature = "etcd"), allow(dead_code))]

mod cache;
mod entry;
#[cfg(feature = "etcd")]
mod etcd;
mod lease;
mod local;

pub use cache::Snapshot;
pub(crate) use entry::{decode_replica, decode_route, encode_replica};
pub use entry::{encode_route, EntryError, Keys, ReplicaEntry, ReplicaId, ReplicaState, RouteEntry};
#[cfg(feature = "etcd")]
pub use etcd::{Lookup, Marker, Store, StoreError};
pub use local::LocalRoutes;
