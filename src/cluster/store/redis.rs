//! The directory in Redis 7 / Valkey (one primary; the layout is `feed`'s). Redis has no lease
//! and no reliable change feed, so both are built here (ARCHITECTURE.md, "Cluster directory"):
//!
//! - `keepalive`: the lease state machine (`store::lease`) over a liveness key. A grant writes
//!   the replica record with a TTL; a keepalive re-`PEXPIRE`s it and the routes hash in one
//!   `MULTI` (O(1) in tunnels); a key gone means the lease is lost; a stop deletes both.
//! - `publish`: every write of a route is a hash write plus an `XADD` to the feed stream, in one
//!   `MULTI`; a new lease rewrites the record and the whole hash.
//! - `watch`: a full read (`SCAN` the replica keys, `GET` + `HGETALL` each) then `XREAD BLOCK`
//!   from the stream's last id; a trimmed id is a gap, a broken connection a reconnect: both read
//!   everything again. Every keepalive interval it checks which replicas' liveness keys are gone
//!   (expiry writes no entry) and drops them.
//!
//! - `acme`: the ACME client's state (SCALEOUT §7) in plain keys, locks extended while held.
//!
//! Commands (keepalive, publisher, record writes, ACME) share one auto-reconnecting connection;
//! the watcher's blocking reads have their own.

mod acme;
mod keepalive;
mod publish;
mod watch;

use std::sync::Arc;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, TlsCertificates};
use tokio::sync::{mpsc, oneshot};

use super::feed::{FeedEvent, RedisKeys, FEED_MAXLEN};
use super::state::{read, read_auth, Boxed, Parts, RecordWriter, Shared, Started, StoreError};
use crate::config::ClusterConfig;

/// Checks the config (endpoint, TLS files, credentials) and hands over the Redis tasks; the
/// connections are made in the background, and retried while the store is down.
pub(super) fn start(
    cfg: &ClusterConfig,
    (shared, local, marker): Parts,
    stop: mpsc::Receiver<oneshot::Sender<()>>,
) -> Result<Started, StoreError> {
    let client = client(cfg)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(shared.timings.request))
        .set_response_timeout(Some(shared.timings.request))
        .set_max_delay(shared.timings.keepalive);
    let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
        .map_err(|e| StoreError::Endpoint(cfg.endpoints.join(","), e.to_string()))?;
    let keys = Arc::new(RedisKeys::new(&cfg.name));
    let acme = Arc::new(acme::RedisAcme::new(
        conn.clone(),
        keys.acme(),
        shared.rid.to_string(),
        (shared.timings.lease_ttl, shared.timings.request),
    ));
    let held = acme.clone().keep_locks(shared.timings.keepalive);
    let writer = Writer {
        conn: conn.clone(),
        keys: keys.clone(),
    };
    let tasks = async move {
        tokio::join!(
            super::keepalive::run(
                shared.clone(),
                keepalive::RedisLease::new(conn.clone(), keys.clone()),
                stop
            ),
            super::publish::run(
                shared.clone(),
                publish::RedisPublish::new(conn, keys.clone()),
                local,
                marker
            ),
            watch::run(shared, client, keys),
            held,
        );
    };
    Ok((Box::new(writer), acme, Box::pin(tasks)))
}

/// The client for the one endpoint: `redis://` or `rediss://` (TLS, with `store_tls`'s CA and
/// client identity when given, else the system's roots), `AUTH` from `store_auth_file`.
fn client(cfg: &ClusterConfig) -> Result<Client, StoreError> {
    let endpoint = cfg.endpoints.first().cloned().unwrap_or_default();
    let bad = |e: redis::RedisError| StoreError::Endpoint(endpoint.clone(), e.to_string());
    let mut info = endpoint.as_str().into_connection_info().map_err(bad)?;
    if let Some(path) = &cfg.store_auth_file {
        let (user, password) = read_auth(path)?;
        let settings = info
            .redis_settings()
            .clone()
            .set_username(user)
            .set_password(password);
        info = info.set_redis_settings(settings);
    }
    let Some(tls) = &cfg.store_tls else {
        return Client::open(info).map_err(bad);
    };
    if !endpoint.starts_with("rediss://") {
        return Err(StoreError::TlsWithRedis(endpoint));
    }
    let client_tls = match &tls.identity {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        None => None,
    };
    let certs = TlsCertificates {
        client_tls,
        root_cert: Some(read(&tls.ca)?),
    };
    Client::build_with_tls(info, certs).map_err(bad)
}

/// `XADD <events> MAXLEN ~ FEED_MAXLEN * <fields>` into `pipe`: every write to the directory
/// goes with one, in the same `MULTI`.
fn xadd(pipe: &mut redis::Pipeline, keys: &RedisKeys, event: &FeedEvent) {
    let cmd = pipe
        .cmd("XADD")
        .arg(keys.events())
        .arg("MAXLEN")
        .arg("~")
        .arg(FEED_MAXLEN)
        .arg("*");
    for (name, value) in event.fields() {
        cmd.arg(name).arg(value);
    }
    cmd.ignore();
}

/// Runs `pipe` (a `MULTI`) within the request timeout.
async fn exec<T: redis::FromRedisValue>(
    shared: &Shared,
    conn: &mut ConnectionManager,
    pipe: &redis::Pipeline,
) -> Result<T, String> {
    match tokio::time::timeout(shared.timings.request, pipe.query_async(conn)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

/// Writes the replica record, if its liveness key still lives (`XX`: a record write never
/// brings back a lease that expired; the keepalive grants a new one).
struct Writer {
    conn: ConnectionManager,
    keys: Arc<RedisKeys>,
}

impl RecordWriter for Writer {
    fn put_record<'a>(&'a self, shared: &'a Shared, _lease: i64, value: Vec<u8>) -> Boxed<'a, bool> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            pipe.cmd("SET")
                .arg(self.keys.replica(&shared.rid))
                .arg(&value)
                .arg("PX")
                .arg(ttl_ms(shared))
                .arg("XX");
            let event = FeedEvent::Replica {
                rid: shared.rid.clone(),
                value,
            };
            xadd(&mut pipe, &self.keys, &event);
            let mut conn = self.conn.clone();
            let set: Result<(Option<String>,), String> = exec(shared, &mut conn, &pipe).await;
            matches!(set, Ok((Some(_),)))
        })
    }
}

/// The lease TTL in milliseconds, for `PX` and `PEXPIRE`.
fn ttl_ms(shared: &Shared) -> u64 {
    u64::try_from(shared.timings.lease_ttl.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use super::*;
    use crate::config::{StoreKind, StoreTls};

    fn config(dir: &Path, endpoint: &str) -> ClusterConfig {
        ClusterConfig::for_tests(dir, StoreKind::Redis, endpoint)
    }

    #[test]
    fn the_endpoint_and_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), "redis://127.0.0.1:6379");
        assert!(client(&cfg).is_ok());
        let auth = dir.path().join("auth");
        cfg.store_auth_file = Some(auth.clone());
        assert_eq!(client(&cfg).unwrap_err().reason(), "read_file");
        std::fs::write(&auth, "edgemux:s3cret\n").unwrap();
        let info = client(&cfg).unwrap().get_connection_info().clone();
        assert_eq!(info.redis_settings().username(), Some("edgemux"));
        cfg.store_tls = Some(StoreTls {
            ca: dir.path().join("ca.pem"),
            identity: None,
        });
        assert_eq!(client(&cfg).unwrap_err().reason(), "tls_with_redis");
        cfg.endpoints = vec!["rediss://127.0.0.1:6379".into()];
        assert_eq!(client(&cfg).unwrap_err().reason(), "read_file");
        cfg = config(dir.path(), "redis://[not an address");
        assert_eq!(client(&cfg).unwrap_err().reason(), "endpoint");
    }
}
