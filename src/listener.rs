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
/// Each connection holds one of `slots` until `serve` returns. The loop waits for a free slot
/// before it accepts, so at the cap the kernel backlog holds new peers, but it takes the slot
/// only once it has a connection: listeners sharing `slots` while they wait for peers would
/// otherwise each keep one, and the real cap would be lower than the configured one.
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
        let free = tokio::select! {
            p = slots.acquire() => p.is_ok(),
            () = shutdown.cancelled() => return,
        };
        if !free {
            return;
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = ACCEPT_BACKOFF_START;
                // Another listener may have taken the free slot meanwhile: this connection then
                // waits for the next one, and this loop with it, as at the cap.
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    () = shutdown.cancelled() => return,
                };
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::sync::mpsc;

    /// Two listeners sharing a cap of two: serving a connection means reading it to its end.
    async fn two_listeners(
        shutdown: &CancellationToken,
    ) -> (SocketAddr, SocketAddr, mpsc::UnboundedReceiver<SocketAddr>) {
        let slots = Arc::new(Semaphore::new(2));
        let (served_tx, served) = mpsc::unbounded_channel();
        let mut addrs = Vec::new();
        for _ in 0..2 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            let served_tx = served_tx.clone();
            let serve = move |mut tcp: TcpStream, peer: SocketAddr| {
                let served_tx = served_tx.clone();
                async move {
                    served_tx.send(peer).unwrap();
                    let _ = tcp.read_to_end(&mut Vec::new()).await;
                }
            };
            let tasks = (shutdown.clone(), TaskTracker::new());
            tokio::spawn(run(listener, slots.clone(), tasks, serve));
        }
        (addrs[0], addrs[1], served)
    }

    async fn next_served(
        served: &mut mpsc::UnboundedReceiver<SocketAddr>,
        within: Duration,
    ) -> Option<SocketAddr> {
        tokio::time::timeout(within, served.recv()).await.ok().flatten()
    }

    #[tokio::test]
    async fn the_connection_cap_is_exact_across_listeners() {
        let shutdown = CancellationToken::new();
        let (a, b, mut served) = two_listeners(&shutdown).await;
        let long = Duration::from_secs(10);

        // An idle listener keeps no slot: both places go to listener `a`.
        let first = TcpStream::connect(a).await.unwrap();
        let second = TcpStream::connect(a).await.unwrap();
        for conn in [&first, &second] {
            let peer = conn.local_addr().unwrap();
            assert_eq!(
                next_served(&mut served, long).await,
                Some(peer),
                "served at the cap of 2"
            );
        }

        // A third connection, on the other listener, waits for a free place.
        let third = TcpStream::connect(b).await.unwrap();
        let waited = next_served(&mut served, Duration::from_millis(300)).await;
        assert_eq!(waited, None, "a third connection was served with a cap of 2");
        drop(first);
        let peer = third.local_addr().unwrap();
        assert_eq!(
            next_served(&mut served, long).await,
            Some(peer),
            "served once a place was free"
        );
        shutdown.cancel();
    }
}
