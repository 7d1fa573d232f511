//! The publisher on Redis: this replica's routes into its routes hash, each write with its feed
//! entry in the same `MULTI`, and the hash's TTL renewed with it (a hash made by this write
//! would otherwise live forever until the next keepalive). A new lease rewrites everything:
//! the record, the hash from scratch, and `up`, `clear` and one `put` per route on the feed. A
//! write that fails leaves its hosts dirty for the next round.

use std::collections::HashSet;
use std::sync::Arc;

use redis::aio::ConnectionManager;

use super::{exec, ttl_ms, xadd};
use crate::cluster::store::entry::{encode_replica, encode_route, RouteEntry};
use crate::cluster::store::feed::{FeedEvent, RedisKeys};
use crate::cluster::store::local::LocalRoutes;
use crate::cluster::store::marker::{Marker, COALESCE};
use crate::cluster::store::state::{Backoff, Shared};

/// Hosts per `MULTI` of a round of dirty hosts: a long outage's backlog goes in bounded
/// transactions (a republish is one, so the hash and the feed's `clear` stay together).
const MAX_HOSTS_PER_MULTI: usize = 512;

/// Publishes until the task is cancelled: republishes everything under each new lease, then
/// writes dirty hosts as they come.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut conn: ConnectionManager,
    keys: Arc<RedisKeys>,
    local: Arc<dyn LocalRoutes>,
    marker: Marker,
) {
    let mut lease_rx = shared.lease.subscribe();
    let mut published: Option<i64> = None;
    let mut backoff = Backoff::new(shared.timings);
    let mut w = Writes {
        shared: &shared,
        conn: &mut conn,
        keys: &keys,
        local: &*local,
        marker: &marker,
    };
    loop {
        let Some(id) = *lease_rx.borrow_and_update() else {
            published = None;
            if lease_rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let written = if published == Some(id) {
            tokio::select! {
                changed = lease_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = marker.dirty() => {}
            }
            tokio::time::sleep(COALESCE).await;
            w.flush().await
        } else {
            let done = w.republish().await;
            if done.is_ok() {
                published = Some(id);
                tracing::info!(replica = %shared.rid, "published every local route under the new lease");
            }
            done
        };
        match written {
            Ok(()) => backoff.reset(),
            Err(e) => {
                tracing::debug!(error = %e, "cluster publish failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next()) => {}
                    _ = lease_rx.changed() => {}
                }
            }
        }
    }
}

struct Writes<'a> {
    shared: &'a Shared,
    conn: &'a mut ConnectionManager,
    keys: &'a RedisKeys,
    local: &'a dyn LocalRoutes,
    marker: &'a Marker,
}

impl Writes<'_> {
    /// Everything under a new lease, in one `MULTI`: the record, the routes hash rewritten, and
    /// the feed told to replace this replica's routes.
    async fn republish(&mut self) -> Result<(), String> {
        let marked = self.marker.take();
        let (shared, keys, rid) = (self.shared, self.keys, &self.shared.rid);
        let record = match encode_replica(&shared.replica()) {
            Ok(r) => r,
            Err(e) => {
                self.marker.restore(marked);
                return Err(e.to_string());
            }
        };
        let ttl = ttl_ms(shared);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET")
            .arg(keys.replica(rid))
            .arg(&record)
            .arg("PX")
            .arg(ttl)
            .ignore();
        pipe.cmd("DEL").arg(keys.routes(rid)).ignore();
        xadd(
            &mut pipe,
            keys,
            &FeedEvent::Replica {
                rid: rid.clone(),
                value: record,
            },
        );
        xadd(&mut pipe, keys, &FeedEvent::Clear { rid: rid.clone() });
        for (host, entry) in self.local.all() {
            route(&mut pipe, keys, shared, &host, Some(&entry));
        }
        pipe.cmd("PEXPIRE").arg(keys.routes(rid)).arg(ttl).ignore();
        exec::<()>(shared, self.conn, &pipe)
            .await
            .inspect_err(|_| self.marker.restore(marked))
    }

    /// The dirty hosts as they are now.
    async fn flush(&mut self) -> Result<(), String> {
        let marked = self.marker.take();
        let hosts: HashSet<String> = if marked.all {
            let mut hosts: HashSet<String> = self.local.all().into_keys().collect();
            hosts.extend(self.shared.cache().hosts_of(&self.shared.rid));
            hosts
        } else {
            marked.hosts.clone()
        };
        let routes = self.local.routes(&hosts);
        let hosts: Vec<&String> = hosts.iter().collect();
        for chunk in hosts.chunks(MAX_HOSTS_PER_MULTI) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for host in chunk {
                route(&mut pipe, self.keys, self.shared, host, routes.get(*host));
            }
            let routes_key = self.keys.routes(&self.shared.rid);
            pipe.cmd("PEXPIRE")
                .arg(routes_key)
                .arg(ttl_ms(self.shared))
                .ignore();
            if let Err(e) = exec::<()>(self.shared, self.conn, &pipe).await {
                self.marker.restore(marked);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// `host`'s route into the hash with its `put`, or out of it with its `del` when it is not
/// served here (or does not fit a value).
fn route(
    pipe: &mut redis::Pipeline,
    keys: &RedisKeys,
    shared: &Shared,
    host: &str,
    entry: Option<&RouteEntry>,
) {
    let rid = shared.rid.clone();
    let hash = keys.routes(&rid);
    let event = match entry.map(encode_route) {
        Some(Ok(value)) => {
            pipe.cmd("HSET").arg(&hash).arg(host).arg(&value).ignore();
            FeedEvent::Route {
                rid,
                host: host.to_owned(),
                value,
            }
        }
        other => {
            if let Some(Err(e)) = other {
                crate::metrics::cluster_dropped_entry(e.reason());
                tracing::warn!(%host, error = %e, "the host's routes do not fit a directory entry; other replicas will not find it");
            }
            pipe.cmd("HDEL").arg(&hash).arg(host).ignore();
            FeedEvent::Unroute {
                rid,
                host: host.to_owned(),
            }
        }
    };
    xadd(pipe, keys, &event);
}
