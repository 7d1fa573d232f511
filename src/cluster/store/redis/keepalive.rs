//! The lease on Redis (`store::keepalive` drives it), over the replica's liveness key. A lease
//! here is a local number for "the liveness key as this replica last wrote it"; a new number
//! means the key was (re)created, so everything is republished under it.
//!
//! - grant: `SET replica:<rid> <record> PX ttl`;
//! - keepalive: `PEXPIRE` the liveness key and the routes hash in one `MULTI`. The liveness key
//!   gone (`0`) is a lost lease: it expired (this replica was cut off for a TTL) or the store was
//!   emptied; the state machine then grants a new one and the publisher republishes everything,
//!   so a fenced replica un-fences as it does on etcd;
//! - revoke: delete both keys and write `down` to the feed, so every cache drops this replica
//!   at once.

use std::sync::Arc;

use redis::aio::ConnectionManager;

use super::{exec, ttl_ms, xadd};
use crate::cluster::store::entry::encode_replica;
use crate::cluster::store::feed::{FeedEvent, RedisKeys};
use crate::cluster::store::keepalive::{LeaseIo, Renewal};
use crate::cluster::store::state::Shared;

pub(super) struct RedisLease {
    conn: ConnectionManager,
    keys: Arc<RedisKeys>,
    /// Leases granted so far: the last one's number.
    granted: i64,
}

impl RedisLease {
    pub(super) fn new(conn: ConnectionManager, keys: Arc<RedisKeys>) -> Self {
        Self {
            conn,
            keys,
            granted: 0,
        }
    }
}

impl LeaseIo for RedisLease {
    async fn grant(&mut self, shared: &Shared) -> Result<i64, String> {
        let record = encode_replica(&shared.replica()).map_err(|e| e.to_string())?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.replica(&shared.rid))
            .arg(record)
            .arg("PX")
            .arg(ttl_ms(shared))
            .ignore();
        exec::<()>(shared, &mut self.conn, &pipe).await?;
        self.granted += 1;
        Ok(self.granted)
    }

    async fn keep_alive(&mut self, shared: &Shared, _id: i64) -> Renewal {
        let ttl = ttl_ms(shared);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("PEXPIRE")
            .arg(self.keys.replica(&shared.rid))
            .arg(ttl)
            .cmd("PEXPIRE")
            .arg(self.keys.routes(&shared.rid))
            .arg(ttl)
            .ignore();
        match exec::<(i64,)>(shared, &mut self.conn, &pipe).await {
            Ok((1,)) => Renewal::Alive,
            Ok(_) => Renewal::Lost,
            Err(e) => Renewal::Failed(e),
        }
    }

    async fn revoke(&mut self, shared: &Shared, _id: i64) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(self.keys.replica(&shared.rid))
            .arg(self.keys.routes(&shared.rid))
            .ignore();
        let down = FeedEvent::Down {
            rid: shared.rid.clone(),
        };
        xadd(&mut pipe, &self.keys, &down);
        match exec::<()>(shared, &mut self.conn, &pipe).await {
            Ok(()) => tracing::info!(replica = %shared.rid, "cluster lease revoked"),
            Err(e) => tracing::warn!(error = %e, "cluster lease revoke failed; it will expire"),
        }
    }
}
