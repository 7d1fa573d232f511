//! The lease task, whatever the backend: drives the lease state machine (`store::lease`),
//! performing each action through the backend's [`LeaseIo`] (etcd: grant, keepalive stream,
//! revoke; Redis: the liveness key), and feeding back what came of it. It publishes the lease
//! believed alive (the publisher republishes under each new one) and its half of the health.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::lease::{self, Delay, GrantReason, LeaseAction, LeaseEvent, LeaseState};
use super::state::{Backoff, Shared};

/// What a keepalive found.
pub(super) enum Renewal {
    /// The lease lives on.
    Alive,
    /// The store does not know the lease (any more).
    Lost,
    /// No answer, or an error: the store may be down.
    Failed(String),
}

/// A backend's lease operations, each bounded by the request timeout.
pub(super) trait LeaseIo: Send {
    /// A new lease; its id, or why not.
    fn grant(&mut self, shared: &Shared) -> impl std::future::Future<Output = Result<i64, String>> + Send;
    fn keep_alive(&mut self, shared: &Shared, id: i64) -> impl std::future::Future<Output = Renewal> + Send;
    /// Ends the lease, so every entry under it leaves at once; logs how that went.
    fn revoke(&mut self, shared: &Shared, id: i64) -> impl std::future::Future<Output = ()> + Send;
}

/// Drives the lease state machine with `io`. Returns once the lease is revoked at stop.
pub(super) async fn run(
    shared: Arc<Shared>,
    io: impl LeaseIo,
    mut stop: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut lease = LeaseTask {
        shared: shared.clone(),
        io,
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
                lease.io.revoke(&shared, id).await;
                lease.stopped();
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

/// The lease task's own state around the backend's I/O.
struct LeaseTask<Io> {
    shared: Arc<Shared>,
    io: Io,
    /// The last keepalive that succeeded (or the grant).
    last_ok: Instant,
    backoff: Backoff,
    /// Who asked to stop, told once the lease is revoked.
    stopper: Option<oneshot::Sender<()>>,
}

impl<Io: LeaseIo> LeaseTask<Io> {
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

    async fn grant(&mut self, reason: GrantReason) -> LeaseEvent {
        match self.io.grant(&self.shared).await {
            Ok(id) => {
                self.ok();
                LeaseEvent::Granted(id)
            }
            Err(e) => {
                tracing::warn!(error = %e, reason = reason.as_str(), "cluster lease grant failed");
                LeaseEvent::StoreDown
            }
        }
    }

    async fn keep_alive(&mut self, id: i64) -> LeaseEvent {
        match self.io.keep_alive(&self.shared, id).await {
            Renewal::Alive => {
                crate::metrics::cluster_lease_renewal("ok");
                self.ok();
                LeaseEvent::KeptAlive
            }
            Renewal::Lost => {
                crate::metrics::cluster_lease_renewal("lost");
                LeaseEvent::Lost {
                    overdue: self.last_ok.elapsed() >= self.shared.timings.lease_ttl,
                }
            }
            Renewal::Failed(e) => {
                crate::metrics::cluster_lease_renewal("failed");
                tracing::debug!(error = %e, "cluster lease keepalive failed");
                LeaseEvent::StoreDown
            }
        }
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
