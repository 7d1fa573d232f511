//! edgemux: a one-port edge gateway. TLS termination, an embedded SSH server for `ssh -R` tunnels
//! and an HTTP reverse proxy into them, demultiplexed on one listener.
//!
//! The binary (`main.rs`) parses flags, loads the config, binds listeners and calls [`run`].

// What is `pub` here is what the binary, the tests, the benches or the fuzz targets use;
// everything else is `pub(crate)`, and this lint keeps it so.
#![warn(unreachable_pub)]
// Without a store backend (the `etcd` feature) nothing builds a cluster, so the registry seam's
// remote side has no caller.
#![cfg_attr(not(feature = "store"), allow(dead_code, unused_imports))]

// Layers, bottom up; a module imports only from layers below it (ARCHITECTURE.md, checked by
// tests/layering.rs).
// Vocabulary, no I/O:
pub(crate) mod budget;
pub mod client_config;
pub mod config;
pub(crate) mod io;
pub mod metrics;
pub mod names;
pub mod rules;
pub mod secret_file;
// Stages:
pub(crate) mod acme;
pub mod cluster;
pub mod http;
pub mod proxy_protocol;
pub(crate) mod route;
pub mod sniff;
pub mod ssh;
pub mod tls;
pub(crate) mod tunnels;
// Composition:
pub(crate) mod admin;
pub(crate) mod conn;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod passthrough;
/// The cluster directory's store, for `tests/cluster_store/`, which drives it against a real
/// etcd and a real Redis; the gateway reaches it as `cluster::store`.
#[doc(hidden)]
pub mod cluster_store {
    pub use crate::cluster::store::{
        encode_route, EntryError, Keys, LocalRoutes, ReplicaEntry, ReplicaId, ReplicaState, RouteEntry,
        Snapshot,
    };
    #[cfg(feature = "store")]
    pub use crate::cluster::store::{Lookup, Marker, Store, StoreError};
}
pub mod gateway;
pub(crate) mod listener;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use gateway::{BuildError, Gateway};

/// Bound listeners, in config order, the optional admin listener, and with `[cluster]` the
/// private peer listener.
#[derive(Debug)]
pub struct Listeners {
    pub main: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
    pub peer: Option<TcpListener>,
}

/// Serves until `shutdown` is cancelled, then drains connections up to a deadline.
pub async fn run(gw: Arc<Gateway>, listeners: Listeners, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let max_connections = gw.limits().max_connections;
    // The cap in force for the process's life (a reload does not resize it).
    crate::metrics::connection_cap(max_connections);
    let slots = Arc::new(Semaphore::new(max_connections));
    let tasks = (shutdown.clone(), tracker.clone());
    for (listener, cfg) in listeners.main.into_iter().zip(gw.config().listeners.iter()) {
        // Logs and metric labels name the address really bound (a config may ask for port 0).
        let mut cfg = cfg.clone();
        cfg.bind = listener.local_addr().unwrap_or(cfg.bind);
        let (cfg, gw, shutdown) = (Arc::new(cfg), gw.clone(), shutdown.clone());
        let serve = move |tcp, peer| conn::handle(gw.clone(), cfg.clone(), tcp, peer, shutdown.clone());
        tokio::spawn(listener::run(listener, slots.clone(), tasks.clone(), serve));
    }
    // The admin listener outlives the drain, so `/readyz` says 503 to the load balancer
    // meanwhile; it has its own tasks, which the drain does not wait for.
    let admin_stop = CancellationToken::new();
    let _admin_stop = admin_stop.clone().drop_guard();
    if let Some(admin) = listeners.admin {
        let admin_slots = Arc::new(Semaphore::new(admin::MAX_ADMIN_CONNECTIONS));
        let (gw, stop) = (gw.clone(), admin_stop.clone());
        let serve = move |tcp, _peer| admin::serve(gw.clone(), tcp, stop.clone());
        let admin_tasks = (admin_stop.clone(), TaskTracker::new());
        tokio::spawn(listener::run(admin, admin_slots, admin_tasks, serve));
    }
    serve_peers(&gw, listeners.peer, &tasks);
    tokio::spawn(gw.http().sweep_idle());
    #[cfg(feature = "store")]
    tokio::spawn(gw.clone().follow_config_hash(shutdown.clone()));
    if let Some(handle) = gw.metrics() {
        tokio::spawn(metrics::run_upkeep(handle.clone()));
    }
    if let Some(acme) = gw.acme() {
        acme.start(shutdown.clone());
    }
    gw.set_ready();
    shutdown.cancelled().await;
    gw.set_draining();
    #[cfg(feature = "store")]
    if let Some(cluster) = gw.cluster() {
        cluster.set_draining().await;
    }
    gw.http().close_idle();
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(open, "draining connections");
    }
    if tokio::time::timeout(gw.limits().drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            cut = tracker.len(),
            "drain deadline reached; cutting the remaining connections"
        );
    }
    #[cfg(feature = "store")]
    if let Some(cluster) = gw.cluster() {
        cluster.stop().await;
    }
}

/// With `[cluster]`, serves the peer listener; its streams are drained like connections.
#[cfg(feature = "store")]
fn serve_peers(gw: &Gateway, listener: Option<TcpListener>, tasks: &(CancellationToken, TaskTracker)) {
    match (gw.cluster(), listener) {
        (Some(cluster), Some(listener)) => cluster.serve_peers(listener, tasks.clone()),
        (Some(_), None) => tracing::error!(
            "[cluster] without a bound peer listener: no replica can reach this one's tunnels"
        ),
        (None, _) => {}
    }
}

#[cfg(not(feature = "store"))]
fn serve_peers(_gw: &Gateway, _listener: Option<TcpListener>, _tasks: &(CancellationToken, TaskTracker)) {}
