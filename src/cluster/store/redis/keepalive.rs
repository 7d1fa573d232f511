//! The lease task on Redis: drives the lease state machine (`store::lease`) over the replica's
//! liveness key. A lease here is a local number for "the liveness key as this task last wrote
//! it"; a new number means the key was (re)created, so everything is republished under it.
//!
//! - grant: `SET replica:<rid> <record> PX ttl`;
//! - keepalive: `PEXPIRE` the liveness key and the routes hash in one `MULTI`. The liveness key
//!   gone (`0`) is a lost lease: it expired (this replica was cut off for a TTL) or the store was
//!   emptied; the machine then grants a new one and the publisher republishes everything, so
//!   a fenced replica un-fences as it does on etcd;
//! - revoke: delete both keys and write `down` to the feed, so every cache drops this replica
//!   at once.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::{exec, ttl_ms, xadd};
use crate::cluster::store::entry::encode_replica;
use crate::cluster::store::feed::{FeedEvent, RedisKeys};
use crate::cluster::store::lease::{self, Delay, LeaseAction, LeaseEvent, LeaseState};
use crate::cluster::store::state::{Backoff, Shared};

/// Drives the lease state machine until the lease is revoked at stop.
pub(super) async fn run(
    shared: Arc<Shared>,
    conn: ConnectionManager,
    keys: Arc<RedisKeys>,
    mut stop: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut lease = LeaseTask {
        shared: shared.clone(),
        conn,
        keys,
        granted: 0,
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
                // The lease channel already names `id`: the publisher is at it.
                action = LeaseAction::KeepAlive {
                    id,
                    after: Delay::Interval,
                };
                continue;
            }
            LeaseAction::KeepAlive { id: _, after } => match lease.pause(after, &mut stop).await {
                Some(e) => e,
                None => lease.keep_alive().await,
            },
            LeaseAction::Revoke(_) => {
                lease.revoke().await;
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

struct LeaseTask {
    shared: Arc<Shared>,
    conn: ConnectionManager,
    keys: Arc<RedisKeys>,
    /// Leases granted so far: the next one's number.
    granted: i64,
    /// The last keepalive that succeeded (or the grant).
    last_ok: Instant,
    backoff: Backoff,
    /// Who asked to stop, told once the keys are deleted.
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
        let record = match encode_replica(&self.shared.replica()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "this replica's record does not fit a directory entry");
                return LeaseEvent::StoreDown;
            }
        };
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.replica(&self.shared.rid))
            .arg(record)
            .arg("PX")
            .arg(ttl_ms(&self.shared))
            .ignore();
        match exec::<()>(&self.shared, &mut self.conn, &pipe).await {
            Ok(()) => {
                self.ok();
                self.granted += 1;
                LeaseEvent::Granted(self.granted)
            }
            Err(e) => {
                tracing::warn!(error = %e, reason = reason.as_str(), "cluster lease grant failed");
                LeaseEvent::StoreDown
            }
        }
    }

    async fn keep_alive(&mut self) -> LeaseEvent {
        let ttl = ttl_ms(&self.shared);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("PEXPIRE")
            .arg(self.keys.replica(&self.shared.rid))
            .arg(ttl)
            .cmd("PEXPIRE")
            .arg(self.keys.routes(&self.shared.rid))
            .arg(ttl)
            .ignore();
        match exec::<(i64,)>(&self.shared, &mut self.conn, &pipe).await {
            Ok((1,)) => {
                crate::metrics::cluster_lease_renewal("ok");
                self.ok();
                LeaseEvent::KeptAlive
            }
            Ok(_) => {
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

    async fn revoke(&mut self) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(self.keys.replica(&self.shared.rid))
            .arg(self.keys.routes(&self.shared.rid))
            .ignore();
        let down = FeedEvent::Down {
            rid: self.shared.rid.clone(),
        };
        xadd(&mut pipe, &self.keys, &down);
        match exec::<()>(&self.shared, &mut self.conn, &pipe).await {
            Ok(()) => tracing::info!(replica = %self.shared.rid, "cluster lease revoked"),
            Err(e) => tracing::warn!(error = %e, "cluster lease revoke failed; it will expire"),
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
