//! The accept loop: it only caps, accepts and spawns. Everything slow runs in the spawned task, so
//! one silent peer can never hold up the next accept.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::gateway::Gateway;

/// Backoff after an accept error (EMFILE, ENOBUFS …): starts small, doubles, capped.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

pub async fn run(
    listener: TcpListener,
    cfg: Arc<ListenerConfig>,
    gw: Arc<Gateway>,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        // Take a connection slot before accepting: at the cap, the kernel backlog holds new peers.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = ACCEPT_BACKOFF_START;
                let (gw, cfg, shutdown) = (gw.clone(), cfg.clone(), shutdown.clone());
                tracker.spawn(async move {
                    crate::conn::handle(gw, cfg, tcp, peer, shutdown).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}
