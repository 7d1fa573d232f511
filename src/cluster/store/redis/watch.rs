//! The watcher on Redis: keeps the cache equal to the store. A full read notes the stream's
//! last id and how many entries it took in so far (`XINFO STREAM`), then `SCAN`s the replica keys and reads each one's record and routes hash into a
//! fresh cache that replaces the old one; `XREAD BLOCK` from the noted id then applies every
//! later entry in order (entries written during the read are applied again: each is a whole
//! value, so that changes nothing).
//!
//! What forces a new full read: entries trimmed before this watcher read them (`gap`: the
//! stream dropped more than the watcher consumed), and any broken or timed-out connection (`reconnect`: a store that restarted empty
//! lost entries without trimming them). Expiry writes no entry, so every keepalive interval the
//! watcher asks which replicas it holds have lost their liveness key, and drops them.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Client, Value};
use tokio::time::Instant;

use crate::cluster::store::cache::{Applied, Change, MAX_ENTRIES};
use crate::cluster::store::entry::ReplicaId;
use crate::cluster::store::feed::{changes, gap, FeedEvent, Position, RedisKeys, StreamId};
use crate::cluster::store::state::{Backoff, Shared};

/// Entries per `XREAD`, keys per `SCAN` step, replicas per pipelined read or liveness check.
const BATCH: usize = 1000;

/// Why following the feed stopped.
enum Ended {
    /// Entries after the last applied one were trimmed.
    Gap,
    /// The connection failed or a request timed out.
    Broken(String),
}

/// Follows the store until the task is cancelled.
pub(super) async fn run(shared: Arc<Shared>, client: Client, keys: Arc<RedisKeys>) {
    let mut backoff = Backoff::new(shared.timings);
    let mut w = Watcher {
        shared,
        keys,
        revision: 0,
    };
    let mut reason = "start";
    loop {
        // No response timeout of the client's own (its default is shorter than a blocking
        // read): every request here has its own bound (`Watcher::timed`).
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(w.shared.timings.request))
            .set_response_timeout(None);
        let connect = client.get_multiplexed_async_connection_with_config(&config);
        let mut conn = match w.timed(connect, Duration::ZERO).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "cluster store unreachable; retrying");
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        let last = match w.read_all(&mut conn).await {
            Ok(last) => last,
            Err(e) => {
                tracing::debug!(error = %e, "cluster directory read failed; retrying");
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        w.resynced(reason);
        // The store answers: a lease retry need not wait out its backoff.
        w.shared.store_back.notify_one();
        w.shared.set_health(|h| h.watch = true);
        let ended = w.follow(&mut conn, last, &mut backoff).await;
        w.shared.set_health(|h| h.watch = false);
        reason = match ended {
            Ended::Gap => {
                tracing::info!(
                    "the cluster feed was trimmed past this replica's place; reading it all again"
                );
                "gap"
            }
            Ended::Broken(e) => {
                tracing::debug!(error = %e, "cluster directory feed broke");
                tokio::time::sleep(backoff.next()).await;
                "reconnect"
            }
        };
    }
}

struct Watcher {
    shared: Arc<Shared>,
    keys: Arc<RedisKeys>,
    /// The cache's revisions are this watcher's count of what it applied: Redis has none.
    revision: i64,
}

impl Watcher {
    /// Runs a request within the request timeout (plus `extra`, for a blocking read).
    async fn timed<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
        extra: Duration,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.shared.timings.request + extra, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer in time".into()),
        }
    }

    fn resynced(&self, reason: &'static str) {
        crate::metrics::cluster_resync(reason);
        let mut counts = self.shared.resyncs.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(reason).or_default() += 1;
        tracing::info!(
            reason,
            entries = self.shared.cache().len(),
            "cluster directory read"
        );
    }

    /// Reads every replica's record and routes into a fresh cache and puts it in place;
    /// returns the place in the feed to follow from.
    async fn read_all(&mut self, conn: &mut MultiplexedConnection) -> Result<Position, String> {
        let info = self.stream_info(conn).await?;
        let at = Position {
            last: info.last,
            consumed: info.added,
        };
        let rids = self.scan_replicas(conn).await?;
        self.revision += 1;
        let mut entries = Vec::new();
        for chunk in rids.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for rid in chunk {
                pipe.cmd("GET").arg(self.keys.replica(rid));
                pipe.cmd("HGETALL").arg(self.keys.routes(rid));
            }
            let values: Vec<Value> = self.timed(pipe.query_async(conn), Duration::ZERO).await?;
            for (rid, pair) in chunk.iter().zip(values.chunks(2)) {
                let [record, routes] = pair else { continue };
                // Expired between the scan and the read: not there.
                let Ok(Some(record)) = redis::from_redis_value_ref::<Option<Vec<u8>>>(record) else {
                    continue;
                };
                entries.push((self.shared.keys.replica(rid).into_bytes(), record, self.revision));
                let routes: Vec<(String, Vec<u8>)> = redis::from_redis_value_ref(routes).unwrap_or_default();
                for (host, value) in routes.into_iter().take(MAX_ENTRIES) {
                    entries.push((
                        self.shared.keys.route(&host, rid).into_bytes(),
                        value,
                        self.revision,
                    ));
                }
            }
        }
        let mut fresh = self.shared.cache().fresh();
        for dropped in fresh.reset(self.revision, entries) {
            crate::metrics::cluster_dropped_entry(dropped.reason());
        }
        let count = fresh.len();
        *self.shared.cache_mut() = fresh;
        self.shared.changed();
        crate::metrics::cluster_directory_entries(count);
        Ok(at)
    }

    /// Every replica with a liveness key (at most the cache's cap).
    async fn scan_replicas(&self, conn: &mut MultiplexedConnection) -> Result<Vec<ReplicaId>, String> {
        let mut rids = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(self.keys.replica_pattern())
                .arg("COUNT")
                .arg(BATCH);
            let (next, found): (u64, Vec<Vec<u8>>) =
                self.timed(scan.query_async(conn), Duration::ZERO).await?;
            rids.extend(found.iter().filter_map(|k| self.keys.parse_replica(k)));
            if next == 0 || rids.len() >= MAX_ENTRIES {
                rids.sort();
                rids.dedup();
                return Ok(rids);
            }
            cursor = next;
        }
    }

    /// Applies the feed from `last` on, and checks liveness every keepalive interval, until
    /// a gap or a broken connection.
    async fn follow(
        &mut self,
        conn: &mut MultiplexedConnection,
        mut at: Position,
        backoff: &mut Backoff,
    ) -> Ended {
        let every = self.shared.timings.keepalive;
        let mut check_at = Instant::now() + every;
        loop {
            let block = check_at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let mut read = redis::cmd("XREAD");
            read.arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX))
                .arg("STREAMS")
                .arg(self.keys.events())
                .arg(at.last.to_string());
            let batch: Option<StreamReadReply> = match self.timed(read.query_async(conn), block).await {
                Ok(b) => b,
                Err(e) => return Ended::Broken(e),
            };
            let entries: Vec<_> = batch
                .into_iter()
                .flat_map(|b| b.keys)
                .flat_map(|k| k.ids)
                .collect();
            if !entries.is_empty() {
                // Trimmed before this batch was read: some entries between were lost. (A trim
                // just after the read looks the same; it only happens to a watcher that far
                // behind, and costs a needless full read.)
                match self.stream_info(conn).await {
                    Ok(info) if gap(at, info.added, info.length) => return Ended::Gap,
                    Ok(_) => {}
                    Err(e) => return Ended::Broken(e),
                }
                at = self.apply(entries, at);
            }
            crate::metrics::cluster_directory_heard();
            backoff.reset();
            if Instant::now() >= check_at {
                if let Err(e) = self.check_liveness(conn).await {
                    return Ended::Broken(e);
                }
                check_at = Instant::now() + every;
            }
        }
    }

    /// The feed stream's last id, entries taken in and length; all zero while it does not exist.
    async fn stream_info(&self, conn: &mut MultiplexedConnection) -> Result<StreamInfo, String> {
        let mut info = redis::cmd("XINFO");
        info.arg("STREAM").arg(self.keys.events());
        match self.timed(info.query_async::<Value>(conn), Duration::ZERO).await {
            Ok(value) => {
                stream_info(&value).ok_or_else(|| "XINFO STREAM without entries-added (Redis < 7.0?)".into())
            }
            Err(e) if e.contains("no such key") => Ok(StreamInfo::default()),
            Err(e) => Err(e),
        }
    }

    /// One batch of feed entries into the cache; returns the place after it.
    fn apply(&mut self, entries: Vec<redis::streams::StreamId>, mut at: Position) -> Position {
        let mut cache = self.shared.cache_mut();
        for entry in entries {
            at.consumed += 1;
            if let Some(id) = StreamId::parse(entry.id.as_bytes()) {
                at.last = at.last.max(id);
            }
            let fields = entry.map.iter().map(|(name, value)| {
                let bytes: &[u8] = match value {
                    Value::BulkString(b) => b,
                    _ => &[],
                };
                (name.as_bytes(), bytes)
            });
            let event = match FeedEvent::decode(fields) {
                Ok(e) => e,
                Err(e) => {
                    crate::metrics::cluster_dropped_entry(e.reason());
                    tracing::debug!(error = %e, id = entry.id, "cluster feed entry dropped");
                    continue;
                }
            };
            self.revision += 1;
            for change in changes(event, &self.shared.keys, |rid| cache.hosts_of(rid), self.revision) {
                report(cache.apply(change));
            }
        }
        crate::metrics::cluster_directory_entries(cache.len());
        drop(cache);
        self.shared.changed();
        at
    }

    /// Drops every replica held whose liveness key is gone (it expired: expiry writes no feed
    /// entry), with its routes.
    async fn check_liveness(&mut self, conn: &mut MultiplexedConnection) -> Result<(), String> {
        let held: Vec<ReplicaId> = self.shared.cache().rids().into_iter().collect();
        let mut gone = Vec::new();
        for chunk in held.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for rid in chunk {
                pipe.cmd("EXISTS").arg(self.keys.replica(rid));
            }
            let alive: Vec<i64> = self.timed(pipe.query_async(conn), Duration::ZERO).await?;
            gone.extend(
                chunk
                    .iter()
                    .zip(alive)
                    .filter(|(_, n)| *n == 0)
                    .map(|(rid, _)| rid.clone()),
            );
        }
        if gone.is_empty() {
            return Ok(());
        }
        let mut cache = self.shared.cache_mut();
        for rid in gone {
            tracing::info!(replica = %rid, "cluster replica expired");
            self.revision += 1;
            let down = FeedEvent::Down { rid };
            let all: Vec<Change> = changes(down, &self.shared.keys, |rid| cache.hosts_of(rid), self.revision);
            for change in all {
                report(cache.apply(change));
            }
        }
        crate::metrics::cluster_directory_entries(cache.len());
        drop(cache);
        self.shared.changed();
        Ok(())
    }
}

/// What `XINFO STREAM` says of the feed.
#[derive(Debug, Default, PartialEq, Eq)]
struct StreamInfo {
    last: StreamId,
    added: u64,
    length: u64,
}

/// Reads `last-generated-id`, `entries-added` and `length` from an `XINFO STREAM` answer (RESP2
/// pairs or a RESP3 map); `None` before Redis 7.0, which has no `entries-added`.
fn stream_info(info: &Value) -> Option<StreamInfo> {
    let pairs: Vec<(&Value, &Value)> = match info {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|p| Some((p.first()?, p.get(1)?)))
            .collect(),
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        _ => return None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let field = |name: &[u8]| {
        pairs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .map(|(_, v)| *v)
    };
    let number = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    Some(StreamInfo {
        last: StreamId::parse(&text(field(b"last-generated-id")?)?)?,
        added: number(field(b"entries-added")?)?,
        length: number(field(b"length")?)?,
    })
}

fn report(applied: Applied) {
    if let Applied::Dropped(e) = applied {
        crate::metrics::cluster_dropped_entry(e.reason());
        tracing::debug!(error = %e, "cluster directory entry dropped");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stream_info_is_read_from_either_protocol() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let resp2 = Value::Array(vec![
            bulk("length"),
            Value::Int(3),
            bulk("last-generated-id"),
            bulk("5-2"),
            bulk("max-deleted-entry-id"),
            bulk("0-0"),
            bulk("entries-added"),
            Value::Int(9),
        ]);
        let info = stream_info(&resp2).unwrap();
        assert_eq!(
            (info.last.to_string(), info.added, info.length),
            ("5-2".into(), 9, 3)
        );
        let resp3 = Value::Map(vec![
            (bulk("length"), Value::Int(0)),
            (bulk("last-generated-id"), Value::SimpleString("0-0".into())),
            (bulk("entries-added"), Value::Int(0)),
        ]);
        assert_eq!(stream_info(&resp3), Some(StreamInfo::default()));
        let before_7 = Value::Array(vec![
            bulk("length"),
            Value::Int(1),
            bulk("last-generated-id"),
            bulk("1-1"),
        ]);
        assert_eq!(stream_info(&before_7), None);
        assert_eq!(stream_info(&Value::Nil), None);
    }
}
