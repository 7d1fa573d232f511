//! The publisher's writes on Redis (`store::publish` runs them): this replica's routes into its routes hash, each write with its feed
//! entry in the same `MULTI`, and the hash's TTL renewed with it (a hash made by this write
//! would otherwise live forever until the next keepalive). A new lease rewrites everything:
//! the record, the hash from scratch, and `up`, `clear` and one `put` per route on the feed. A
//! write that fails leaves its hosts dirty for the next round.

use std::sync::Arc;

use redis::aio::ConnectionManager;

use super::{exec, ttl_ms, xadd};
use crate::cluster::store::entry::{encode_replica, encode_route, RouteEntry};
use crate::cluster::store::feed::{FeedEvent, RedisKeys};
use crate::cluster::store::local::LocalRoutes;
use crate::cluster::store::marker::Marker;
use crate::cluster::store::publish::{dirty_hosts, PublishIo};
use crate::cluster::store::state::Shared;

/// Hosts per `MULTI` of a round of dirty hosts: a long outage's backlog goes in bounded
/// transactions (a republish is one, so the hash and the feed's `clear` stay together).
const MAX_HOSTS_PER_MULTI: usize = 512;

/// The publisher's writes on Redis.
pub(super) struct RedisPublish {
    conn: ConnectionManager,
    keys: Arc<RedisKeys>,
}

impl RedisPublish {
    pub(super) fn new(conn: ConnectionManager, keys: Arc<RedisKeys>) -> Self {
        Self { conn, keys }
    }
}

impl PublishIo for RedisPublish {
    /// Everything under a new lease, in one `MULTI`: the record, the routes hash rewritten, and
    /// the feed told to replace this replica's routes.
    async fn republish(
        &mut self,
        shared: &Shared,
        local: &dyn LocalRoutes,
        marker: &Marker,
        _id: i64,
    ) -> Result<(), String> {
        let marked = marker.take();
        let (keys, rid) = (&*self.keys, &shared.rid);
        let record = match encode_replica(&shared.replica()) {
            Ok(r) => r,
            Err(e) => {
                marker.restore(marked);
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
        for (host, entry) in local.all() {
            route(&mut pipe, keys, shared, &host, Some(&entry));
        }
        pipe.cmd("PEXPIRE").arg(keys.routes(rid)).arg(ttl).ignore();
        exec::<()>(shared, &mut self.conn, &pipe)
            .await
            .inspect_err(|_| marker.restore(marked))
    }

    /// The dirty hosts as they are now.
    async fn flush(
        &mut self,
        shared: &Shared,
        local: &dyn LocalRoutes,
        marker: &Marker,
        _id: i64,
    ) -> Result<(), String> {
        let marked = marker.take();
        let hosts = dirty_hosts(&marked, shared, local);
        let routes = local.routes(&hosts);
        let hosts: Vec<&String> = hosts.iter().collect();
        for chunk in hosts.chunks(MAX_HOSTS_PER_MULTI) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for host in chunk {
                route(&mut pipe, &self.keys, shared, host, routes.get(*host));
            }
            let routes_key = self.keys.routes(&shared.rid);
            pipe.cmd("PEXPIRE").arg(routes_key).arg(ttl_ms(shared)).ignore();
            if let Err(e) = exec::<()>(shared, &mut self.conn, &pipe).await {
                marker.restore(marked);
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
