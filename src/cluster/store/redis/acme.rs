//! The ACME seam (`acme::shared::SharedStore`) on Redis: plain keys under `emx:{c}:acme:`, each
//! call bounded by `store_timeout`. A lock is `SET locks/<name> <replica id> NX PX <lease TTL>`,
//! kept as long as this replica lives: every keepalive interval a script extends each lock it
//! holds, if the value is still its own. A replica that dies, or is cut from the store, loses
//! its locks within the TTL, as it loses its liveness key. Compare-and-swap and the guarded
//! release are scripts too, atomic on the primary.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use crate::acme::shared::{SharedError, SharedStore, StoreFuture};

/// At most this many keys in one list, as on etcd.
const MAX_LIST: usize = 4096;
/// Keys asked for per `SCAN` step.
const SCAN_COUNT: usize = 512;

/// `KEYS[1]` := `ARGV[3]` if it holds `ARGV[2]` now (`ARGV[1]` = `1`), or nothing (`0`).
const CAS: &str = r"
local v = redis.call('GET', KEYS[1])
if (ARGV[1] == '0' and not v) or (ARGV[1] == '1' and v == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3])
  return 1
end
return 0";
/// Extends lock `KEYS[1]` by `ARGV[2]` ms if its value is `ARGV[1]`.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";
/// Deletes lock `KEYS[1]` if its value is `ARGV[1]`.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// This replica's ACME view of Redis.
pub(super) struct RedisAcme {
    conn: ConnectionManager,
    /// `emx:{c}:acme:`.
    root: String,
    /// The lock value: this replica's id, incarnation included.
    rid: String,
    /// A lock's life without a refresh: the replica's liveness TTL.
    lock_ttl: Duration,
    timeout: Duration,
    /// Names whose lock this replica holds, refreshed by [`RedisAcme::keep_locks`].
    held: Mutex<HashSet<String>>,
}

impl RedisAcme {
    pub(super) fn new(
        conn: ConnectionManager,
        root: String,
        rid: String,
        (lock_ttl, timeout): (Duration, Duration),
    ) -> Self {
        Self {
            conn,
            root,
            rid,
            lock_ttl,
            timeout,
            held: Mutex::default(),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    fn lock_key(&self, name: &str) -> String {
        self.key(&format!("locks/{name}"))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.lock_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    async fn timed<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, SharedError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) if e.is_connection_refusal() || e.is_connection_dropped() => {
                Err(SharedError::NotConnected)
            }
            Ok(Err(e)) => Err(SharedError::Store(e.to_string())),
            Err(_) => Err(SharedError::Timeout),
        }
    }

    async fn list_inner(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, SharedError> {
        let pattern = format!("{}*", glob_escape(&self.key(prefix)));
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let (next, found): (u64, Vec<String>) = self.timed(scan.query_async(&mut conn)).await?;
            keys.extend(found);
            cursor = next;
            if cursor == 0 || keys.len() >= MAX_LIST {
                break;
            }
        }
        keys.sort_unstable();
        keys.dedup();
        keys.truncate(MAX_LIST);
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = self
            .timed(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
            .await?;
        Ok(keys
            .into_iter()
            .zip(values)
            .filter_map(|(key, value)| Some((key.strip_prefix(&self.root)?.to_owned(), value?)))
            .collect())
    }

    async fn lock_inner(&self, name: &str) -> Result<bool, SharedError> {
        let key = self.lock_key(name);
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(&key)
            .arg(&self.rid)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms());
        let taken: Option<String> = self.timed(set.query_async(&mut conn)).await?;
        // Held already: by this very replica (a lock it did not get to release) or another.
        let ours = match taken {
            Some(_) => true,
            None => {
                let holder: Option<String> = self
                    .timed(redis::cmd("GET").arg(&key).query_async(&mut conn))
                    .await?;
                holder.as_deref() == Some(self.rid.as_str())
            }
        };
        if ours {
            self.held().insert(name.to_owned());
        }
        Ok(ours)
    }

    async fn unlock_inner(&self, name: &str) -> Result<(), SharedError> {
        self.held().remove(name);
        let mut conn = self.conn.clone();
        let release = Script::new(RELEASE);
        let mut call = release.key(self.lock_key(name));
        call.arg(&self.rid);
        let _: i64 = self.timed(call.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Until cancelled (with the backend's tasks): every `every`, extends each lock this replica
    /// holds; one found taken over (it expired while the store was out of reach) is forgotten.
    pub(super) async fn keep_locks(self: Arc<Self>, every: Duration) {
        let extend = Script::new(EXTEND);
        loop {
            tokio::time::sleep(every).await;
            let names: Vec<String> = self.held().iter().cloned().collect();
            for name in names {
                let mut conn = self.conn.clone();
                let mut call = extend.key(self.lock_key(&name));
                call.arg(&self.rid).arg(self.ttl_ms());
                match self.timed(call.invoke_async::<i64>(&mut conn)).await {
                    Ok(1) => {}
                    Ok(_) => {
                        tracing::warn!(
                            name,
                            "the ACME lock expired while held; another replica may order"
                        );
                        self.held().remove(&name);
                    }
                    Err(e) => tracing::debug!(name, error = %e, "ACME lock not extended; trying again"),
                }
            }
        }
    }
}

/// `text` with Redis glob specials escaped, for a `MATCH` pattern of that literal prefix.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl SharedStore for RedisAcme {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.timed(redis::cmd("GET").arg(self.key(key)).query_async(&mut conn))
                .await
        })
    }

    fn put_ttl<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut set = redis::cmd("SET");
            set.arg(self.key(key)).arg(value).arg("PX").arg(ms);
            self.timed(set.query_async::<()>(&mut conn)).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.timed(redis::cmd("DEL").arg(self.key(key)).query_async::<()>(&mut conn))
                .await
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let cas = Script::new(CAS);
            let mut call = cas.key(self.key(key));
            match expected {
                Some(v) => call.arg("1").arg(v),
                None => call.arg("0").arg(""),
            };
            call.arg(value);
            let swapped: i64 = self.timed(call.invoke_async(&mut conn)).await?;
            Ok(swapped == 1)
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<(String, Vec<u8>)>> {
        Box::pin(self.list_inner(prefix))
    }

    fn lock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(self.lock_inner(name))
    }

    fn unlock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.unlock_inner(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_matches_only_itself() {
        assert_eq!(glob_escape("emx:{c}:acme:certs/"), "emx:{c}:acme:certs/");
        assert_eq!(glob_escape("a*b?c[d]e\\"), "a\\*b\\?c\\[d\\]e\\\\");
    }
}
