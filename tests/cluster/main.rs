//! Several replicas acting as one, end to end (SCALEOUT §9.2): three `edgemux serve` replicas
//! on a real store (etcd, or Redis with `EDGEMUX_TEST_STORE=redis`) behind a real HAProxy (`send-proxy-v2`, health checks on `/readyz`), real
//! OpenSSH tunnel clients, curl and WebSocket visitors from their own address. Each test starts
//! its own cluster on port 0 (`tests/common/cluster.rs`, at most two at once), polls every
//! condition against a deadline and prints what it measured; nothing sleeps a fixed time.
//!
//! - `serving`: a tunnel on r1 serves visitors on r2 and r3 (bodies, WebSocket, bulk, the
//!   visitor's address at the backend and the owner, the `hop` label).
//! - `private`: `ssh -L` across replicas and its refusals; `ssh gw tunnels` cluster-wide.
//! - `pool`: one pool with members on two replicas.
//! - `failover`: a replica killed, a replica stopped.
//! - `peer_port`: the peer listener speaks only mutual TLS.
//! - `outage`: the store frozen, then back empty.
//! - `drift`: a replica with other authorized keys is flagged on every replica and named.
//! - `partition`: r1 cut from its peers only; ejection, fast 502s, recovery.
//! - `acme`: one ACME order per name fleet-wide, validation answered by any replica, a restart
//!   orders nothing, a frozen store defers a forced renewal.
#![cfg(feature = "store")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod acme;
mod drift;
mod failover;
mod fence;
mod outage;
mod partition;
mod peer_port;
mod pool;
mod private;
mod serving;

use std::time::{Duration, Instant};

use common::process::poll_until;
use common::SETUP;

/// Polls `probe` until it holds, up to `deadline`; returns how long it took, or panics with
/// `what` and the last `explain()`.
pub fn until(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) -> Duration {
    let started = Instant::now();
    if poll_until(deadline, || probe().then_some(())).is_none() {
        panic!("{what}: not within {deadline:?}; {}", explain());
    }
    started.elapsed()
}

/// `until` with the setup deadline, for steps whose time is not what the test is about.
pub fn settle(what: &str, probe: impl FnMut() -> bool, explain: impl Fn() -> String) -> Duration {
    until(what, SETUP, probe, explain)
}
