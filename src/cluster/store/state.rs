//! What every store backend shares with the [`Store`](super::Store) and its [`Lookup`]s: the
//! cache, this replica's record, the lease it believes alive, and the store's health; the
//! config files a backend reads; the retry backoff. No I/O on the store here: the backends
//! (`etcd`, `redis`) fill these in, and everything above the store reads them the same way.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::cache::{Cache, Snapshot};
use super::entry::{Keys, ReplicaEntry, ReplicaId, RouteEntry};
use super::local::LocalRoutes;
use super::marker::Marker;
use crate::acme::shared::SharedStore;

/// A boxed future, as the backends hand them over.
pub(super) type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend's write of this replica's record under its lease (`value`: the encoded record).
/// `false`: the store could not be told now.
pub(super) trait RecordWriter: Send + Sync {
    fn put_record<'a>(&'a self, shared: &'a Shared, lease: i64, value: Vec<u8>) -> Boxed<'a, bool>;
}

/// What a backend's tasks get: the shared state, this replica's routes, the dirty hosts.
pub(super) type Parts = (Arc<Shared>, Arc<dyn LocalRoutes>, Marker);

/// A started backend: its record writer, the ACME client's view of it (SCALEOUT §7), and its
/// tasks (until cancelled, or the lease is revoked at a stop request).
pub(super) type Started = (Box<dyn RecordWriter>, Arc<dyn SharedStore>, Boxed<'static, ()>);

/// The first retry after a failure; doubled up to [`BACKOFF_MAX`]. Short, so a store that blinks
/// costs little; bounded, so a store that is down gets a few requests a second at most.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between retries (capped further at the keepalive interval, so a lease is
/// tried again well within its TTL).
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Why the store could not be started (config files; the store itself may be down).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("{0}: expected `user:password` on one line")]
    AuthFormat(PathBuf),
    #[error("store_tls is set but {0} is not an https:// endpoint")]
    TlsWithHttp(String),
    #[error("store_tls is set but {0} is not a rediss:// endpoint")]
    TlsWithRedis(String),
    #[error("{0} is not a Redis URL: {1}")]
    Endpoint(String, String),
    #[error("the {0} store backend is not in this build (cargo feature `{0}`)")]
    NotBuilt(&'static str),
}

impl StoreError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadFile { .. } => "read_file",
            Self::AuthFormat(_) => "auth_format",
            Self::TlsWithHttp(_) => "tls_with_http",
            Self::TlsWithRedis(_) => "tls_with_redis",
            Self::Endpoint(..) => "endpoint",
            Self::NotBuilt(_) => "not_built",
        }
    }
}

/// Timings from `[cluster]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timings {
    pub(super) lease_ttl: Duration,
    pub(super) keepalive: Duration,
    /// Each store request; longer counts as the store being down.
    pub(super) request: Duration,
}

/// State the tasks share with the [`Store`] and its [`Lookup`]s.
pub(super) struct Shared {
    pub(super) keys: Keys,
    pub(super) rid: ReplicaId,
    pub(super) timings: Timings,
    pub(super) cache: RwLock<Cache>,
    pub(super) replica: Mutex<ReplicaEntry>,
    /// The lease entries are written under while it is believed alive; the publisher
    /// republishes everything when it changes to a new one.
    pub(super) lease: tokio::sync::watch::Sender<Option<i64>>,
    /// The lease is kept alive, and the watcher follows the store: see [`Shared::set_health`].
    pub(super) health: Mutex<Health>,
    /// The watcher got through: a lease retry need not wait out its backoff.
    pub(super) store_back: Notify,
    pub(super) resyncs: Mutex<BTreeMap<&'static str, u64>>,
    /// Bumped after every change to the cache (events applied, a full read put in place) and to
    /// this replica's record.
    pub(super) changes: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Tells the [`Lookup::changes`] followers that the cache (or this replica's record) changed.
    pub(super) fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(super) fn cache(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn cache_mut(&self) -> RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn replica(&self) -> MutexGuard<'_, ReplicaEntry> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lease(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    pub(super) fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates one side of the store's health; the gauge follows the whole.
    pub(super) fn set_health(&self, change: impl FnOnce(&mut Health)) {
        let mut health = self.health();
        let was = health.up();
        change(&mut health);
        let up = health.up();
        if up != was {
            crate::metrics::cluster_store_up(up);
            tracing::info!(up, lease = health.lease, watch = health.watch, "cluster store");
        }
    }
}

/// Whether the store serves this replica: it answers the lease's keepalives, and the watcher
/// follows it. Both count: etcd 3.4 keeps a lease alive for a client whose reads and writes it
/// refuses (bad credentials), and a hung store is found by the keepalives, not by a quiet watch.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Health {
    pub(super) lease: bool,
    pub(super) watch: bool,
}

impl Health {
    pub(super) fn up(self) -> bool {
        self.lease && self.watch
    }
}

/// The cache, for lookups: no I/O, a short read lock. Cheap to clone.
#[derive(Clone)]
pub struct Lookup(pub(super) Arc<Shared>);

impl Lookup {
    /// The other replicas serving `host` (see [`Cache::routes`]).
    pub fn routes(&self, host: &str) -> Vec<(ReplicaId, RouteEntry)> {
        self.0.cache().routes(host)
    }

    /// One replica's record: its peer address and state.
    pub fn replica(&self, rid: &ReplicaId) -> Option<ReplicaEntry> {
        self.0.cache().replica(rid)
    }

    /// The other replicas.
    pub fn replicas(&self) -> Vec<(ReplicaId, ReplicaEntry)> {
        self.0.cache().replicas()
    }

    /// Reads a route another replica answered for `host`, with the checks of an entry from the
    /// store (size, JSON, the key id in the host or a reserve).
    pub fn decode_route(&self, host: &str, value: &[u8]) -> Result<RouteEntry, super::EntryError> {
        self.0.cache().decode_route(host, value)
    }

    /// Whether the store serves this replica now (lease kept alive, watch following): when not,
    /// the copy may be stale.
    pub fn store_up(&self) -> bool {
        self.0.health().up()
    }

    /// Changes whenever the cache does, or this replica's own record: for those who act on
    /// replicas leaving or draining, or compare config hashes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    /// This replica's config hash, as its record carries it.
    pub fn config_hash(&self) -> String {
        self.0.replica().config_hash.clone()
    }

    /// Everything in the cache, this replica's own entries included.
    pub fn snapshot(&self) -> Snapshot {
        self.0.cache().snapshot()
    }

    /// Entries not taken so far, for `reason` (an `EntryError::reason`).
    pub fn dropped(&self, reason: &str) -> u64 {
        self.0.cache().dropped(reason)
    }
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lookup").field(&self.0.rid).finish()
    }
}

pub(super) fn read(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// `user:password` on the first line.
pub(super) fn read_auth(path: &Path) -> Result<(String, String), StoreError> {
    let text = String::from_utf8(read(path)?).map_err(|_| StoreError::AuthFormat(path.to_owned()))?;
    let line = text.lines().next().unwrap_or_default().trim_end();
    match line.split_once(':') {
        Some((user, password)) if !user.is_empty() && !password.is_empty() => {
            Ok((user.to_owned(), password.to_owned()))
        }
        _ => Err(StoreError::AuthFormat(path.to_owned())),
    }
}

/// Exponential backoff between [`BACKOFF_START`] and a cap.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(timings: Timings) -> Self {
        let max = BACKOFF_MAX.min(timings.keepalive);
        Self {
            next: BACKOFF_START.min(max),
            max,
        }
    }

    pub(super) fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    pub(super) fn reset(&mut self) {
        self.next = BACKOFF_START.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let timings = Timings {
            lease_ttl: Duration::from_secs(3),
            keepalive: Duration::from_secs(1),
            request: Duration::from_secs(1),
        };
        let mut b = Backoff::new(timings);
        let waits: Vec<u128> = (0..6).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), BACKOFF_START);
    }
}
