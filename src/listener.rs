//! The accept loop, for the main listeners and the admin listener alike: it only caps, accepts
//! and spawns. Everything slow runs in the spawned task, so one silent peer can never hold up
//! the next accept.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Backoff after an accept error (EMFILE, ENOBUFS …): starts small, doubles, capped.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `shutdown`, running `serve` for each connection in a task `tracker` follows.
/// A connection takes one of `slots` before it is accepted and holds it until `serve` returns:
/// at the cap, the kernel backlog holds new peers.
pub(crate) async fn run<F, Fut>(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    (shutdown, tracker): (CancellationToken, TaskTracker),
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
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
                let served = serve(tcp, peer);
                tracker.spawn(async move {
                    served.await;
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
