//! The cluster directory in a shared store (etcd): this replica's routes published under its
//! lease, and a full in-memory copy of everyone's, fed by a watch (SCALEOUT §3).
//!
//! - `entry`: keys and values, and the checks a value read back must pass (pure);
//! - `cache`: the reducer that applies the store's events to the in-memory copy (pure);
//! - `lease`: the lease state machine, events to actions (pure);
//! - `local`: this replica's routes, read from the tunnel registry.

// The etcd shell that drives these comes next.
#![allow(dead_code, unreachable_pub)]

mod cache;
mod entry;
mod lease;
mod local;
