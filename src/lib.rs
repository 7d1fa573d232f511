//! edgemux: a one-port edge gateway. TLS termination, an embedded SSH server for `ssh -R` tunnels
//! and an HTTP reverse proxy into them, demultiplexed on one listener.
//!
//! The binary (`main.rs`) parses flags, loads the config, binds listeners and calls [`run`].

pub mod acme;
pub mod admin;
pub mod certs;
pub mod config;
pub mod conn;
pub mod counted;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod prefixed;
pub mod proxy_protocol;
pub mod route;
pub mod sniff;
pub mod ssh;
pub mod tls;
pub mod tunnels;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use gateway::Gateway;

/// Bound listeners, in config order, and the optional admin listener.
#[derive(Debug)]
pub struct Listeners {
    pub main: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Serves until `shutdown` is cancelled, then drains connections up to a deadline.
pub async fn run(gw: Arc<Gateway>, listeners: Listeners, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(gw.limits().max_connections));
    for (listener, cfg) in listeners.main.into_iter().zip(gw.config().listeners.iter()) {
        // Logs and metric labels name the address really bound (a config may ask for port 0).
        let mut cfg = cfg.clone();
        cfg.bind = listener.local_addr().unwrap_or(cfg.bind);
        tokio::spawn(listener::run(
            listener,
            Arc::new(cfg),
            gw.clone(),
            slots.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    if let Some(admin) = listeners.admin {
        tokio::spawn(admin::run(admin, gw.clone(), shutdown.clone()));
    }
    if let Some(handle) = gw.metrics() {
        tokio::spawn(metrics::run_upkeep(handle.clone()));
    }
    if let Some(acme) = gw.acme() {
        acme.start(shutdown.clone());
    }
    gw.set_ready();
    shutdown.cancelled().await;
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
}
