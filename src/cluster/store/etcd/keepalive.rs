//! The lease task: drives the lease state machine (`store::lease`), performing each action
//! against etcd (grant, keepalive on one stream, revoke) and feeding back what came of it.

use std::sync::Arc;
use std::time::Instant;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::{mpsc, oneshot};

use super::{Backoff, Shared};
use crate::cluster::store::lease::{self, Delay, LeaseAction, LeaseEvent, LeaseState};

/// Drives the lease state machine (`lease`): performs its actions and feeds back what came of
/// them. Returns once the lease is revoked at stop.
pub(super) async fn run(shared: Arc<Shared>, client: Client, mut stop: mpsc::Receiver<oneshot::Sender<()>>) {
    let mut lease = LeaseTask {
        shared: shared.clone(),
        client,
        keeper: None,
        last_ok: Instant::now(),
        backoff: Backoff::new(shared.timings),
        stopper: None,
    };
    let (mut state, mut action) = lease::start();
    loop {
        let event = match action {
            LeaseAction::Grant { reason, after } => match lease.pause(after, &mut stop).await {
                Some(e) => e,
                None => lease.grant(reason).await,
            },
            LeaseAction::Republish(id) => {
                // The lease channel already names `id`: the publisher is at it. Keep it alive.
                action = LeaseAction::KeepAlive {
                    id,
                    after: Delay::Interval,
                };
                continue;
            }
            LeaseAction::KeepAlive { id, after } => match lease.pause(after, &mut stop).await {
                Some(e) => e,
                None => lease.keep_alive(id).await,
            },
            LeaseAction::Revoke(id) => {
                lease.revoke(id).await;
                return;
            }
            LeaseAction::Done => {
                lease.stopped();
                return;
            }
        };
        let (next, next_action) = lease::step(state, event);
        if let (LeaseEvent::Granted(_), LeaseState::Granting(reason)) = (event, state) {
            crate::metrics::cluster_lease_grant(reason.as_str());
            tracing::info!(replica = %shared.rid, reason = reason.as_str(), "cluster lease granted");
        }
        shared.lease.send_if_modified(|current| {
            let changed = *current != next.lease();
            *current = next.lease();
            changed
        });
        shared.set_health(|h| h.lease = next.store_up());
        (state, action) = (next, next_action);
    }
}

/// The lease task's I/O.
struct LeaseTask {
    shared: Arc<Shared>,
    client: Client,
    /// The keepalive stream of the current lease.
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
    /// The last keepalive that succeeded (or the grant).
    last_ok: Instant,
    backoff: Backoff,
    /// Who asked to stop, told once the lease is revoked.
    stopper: Option<oneshot::Sender<()>>,
}

impl LeaseTask {
    /// Waits as `after` says, unless a stop request or (during a backoff) the store coming back
    /// cuts it short: that is then the next event.
    async fn pause(
        &mut self,
        after: Delay,
        stop: &mut mpsc::Receiver<oneshot::Sender<()>>,
    ) -> Option<LeaseEvent> {
        let wait = match after {
            Delay::Now => return None,
            Delay::Interval => self.shared.timings.keepalive,
            Delay::Backoff => self.backoff.next(),
        };
        let shared = self.shared.clone();
        tokio::select! {
            () = tokio::time::sleep(wait) => None,
            Some(done) = stop.recv() => {
                self.stopper = Some(done);
                Some(LeaseEvent::Stop)
            }
            () = shared.store_back.notified(), if after == Delay::Backoff => Some(LeaseEvent::StoreUp),
        }
    }

    async fn grant(&mut self, reason: lease::GrantReason) -> LeaseEvent {
        let ttl = i64::try_from(self.shared.timings.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let mut client = self.client.lease_client();
        match tokio::time::timeout(self.shared.timings.request, client.grant(ttl, None)).await {
            Ok(Ok(granted)) => {
                self.ok();
                LeaseEvent::Granted(granted.id())
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, reason = reason.as_str(), "cluster lease grant failed");
                LeaseEvent::StoreDown
            }
            Err(_) => LeaseEvent::StoreDown,
        }
    }

    async fn keep_alive(&mut self, id: i64) -> LeaseEvent {
        let timeout = self.shared.timings.request;
        let keeper = match self.keeper.take() {
            Some(k) if k.0 == id => Some(k),
            _ => None,
        };
        let answer = match keeper {
            // Opening the stream sends the first keepalive and reads its answer.
            None => match tokio::time::timeout(timeout, self.client.lease_client().keep_alive(id)).await {
                Ok(Ok((keeper, stream))) => {
                    self.keeper = Some((id, keeper, stream));
                    Ok(true)
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m == "lease not found" => Ok(false),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            },
            Some((_, mut keeper, mut stream)) => {
                let sent = keeper.keep_alive().await;
                match tokio::time::timeout(timeout, stream.message()).await {
                    Ok(Ok(Some(r))) if sent.is_ok() => {
                        let alive = r.ttl() > 0;
                        self.keeper = alive.then_some((id, keeper, stream));
                        Ok(alive)
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".into()),
                    _ => Err("keepalive stream closed".into()),
                }
            }
        };
        match answer {
            Ok(true) => {
                crate::metrics::cluster_lease_renewal("ok");
                self.ok();
                LeaseEvent::KeptAlive
            }
            Ok(false) => {
                crate::metrics::cluster_lease_renewal("lost");
                LeaseEvent::Lost {
                    overdue: self.last_ok.elapsed() >= self.shared.timings.lease_ttl,
                }
            }
            Err(e) => {
                crate::metrics::cluster_lease_renewal("failed");
                tracing::debug!(error = %e, "cluster lease keepalive failed");
                LeaseEvent::StoreDown
            }
        }
    }

    async fn revoke(&mut self, id: i64) {
        let mut leases = self.client.lease_client();
        let revoke = leases.revoke(id);
        match tokio::time::timeout(self.shared.timings.request, revoke).await {
            Ok(Ok(_)) => tracing::info!(replica = %self.shared.rid, "cluster lease revoked"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cluster lease revoke failed; it will expire"),
            Err(_) => tracing::warn!("cluster lease revoke timed out; it will expire"),
        }
        self.stopped();
    }

    fn stopped(&mut self) {
        self.shared.lease.send_replace(None);
        if let Some(done) = self.stopper.take() {
            let _ = done.send(());
        }
    }

    fn ok(&mut self) {
        self.last_ok = Instant::now();
        self.backoff.reset();
    }
}
