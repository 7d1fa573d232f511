//! The directory in etcd: one lease per replica, kept alive by `keepalive`; a publisher that
//! writes this replica's routes under it (`publish`); a watcher that keeps the cache of
//! everyone's (`watch`).
//!
//! Nothing here blocks the gateway: hosts are marked dirty without waiting, lookups read the
//! cache under a short lock, and a store that is down only delays writes and stales the cache.
//! The store may be down at start too: the client connects in the background and retries.

mod keepalive;
mod publish;
mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::cache::{Cache, Snapshot, MAX_ENTRIES};
use super::entry::{encode_replica, Keys, ReplicaEntry, ReplicaId, ReplicaState, Reserved, RouteEntry};
use super::local::{unix_now, LocalRoutes};
use crate::config::{ClusterConfig, StoreTls};
use crate::names::KeyFingerprint;

pub use publish::Marker;

/// The first retry after a failure; doubled up to [`BACKOFF_MAX`]. Short, so a store that blinks
/// costs little; bounded, so a store that is down gets a few requests a second at most.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between retries (capped further at the keepalive interval, so a lease is
/// tried again well within its TTL).
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// HTTP/2 pings on the store connection find a store that hangs (SIGSTOP, a dead host) while
/// streams wait for events. etcd refuses pings more often than every 5 s
/// (`--grpc-keepalive-min-time`), and without a stream open (so none are sent then).
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Why the store could not be started (config files; the store itself may be down).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("{0}: expected `user:password` on one line")]
    AuthFormat(PathBuf),
    #[error("store_tls is set but {0} is not an https:// endpoint")]
    TlsWithHttp(String),
}

impl StoreError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ReadFile { .. } => "read_file",
            Self::AuthFormat(_) => "auth_format",
            Self::TlsWithHttp(_) => "tls_with_http",
        }
    }
}

/// Timings from `[cluster]`.
#[derive(Debug, Clone, Copy)]
struct Timings {
    lease_ttl: Duration,
    keepalive: Duration,
    /// Each store request; longer counts as the store being down.
    request: Duration,
}

/// State the tasks share with the [`Store`] and its [`Lookup`]s.
struct Shared {
    keys: Keys,
    rid: ReplicaId,
    timings: Timings,
    cache: RwLock<Cache>,
    replica: Mutex<ReplicaEntry>,
    /// The lease entries are written under while it is believed alive; the publisher
    /// republishes everything when it changes to a new one.
    lease: tokio::sync::watch::Sender<Option<i64>>,
    /// The lease is kept alive, and the watcher follows the store: see [`Shared::set_health`].
    health: Mutex<Health>,
    /// The watcher got through: a lease retry need not wait out its backoff.
    store_back: Notify,
    resyncs: Mutex<BTreeMap<&'static str, u64>>,
    /// Bumped after every change to the cache (events applied, a full read put in place) and to
    /// this replica's record.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Tells the [`Lookup::changes`] followers that the cache (or this replica's record) changed.
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn cache(&self) -> RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn cache_mut(&self) -> RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    fn replica(&self) -> MutexGuard<'_, ReplicaEntry> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates one side of the store's health; the gauge follows the whole.
    fn set_health(&self, change: impl FnOnce(&mut Health)) {
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
struct Health {
    lease: bool,
    watch: bool,
}

impl Health {
    fn up(self) -> bool {
        self.lease && self.watch
    }
}

/// The cache, for lookups: no I/O, a short read lock. Cheap to clone.
#[derive(Clone)]
pub struct Lookup(Arc<Shared>);

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

/// This replica's part in the directory. Dropping it stops its tasks without revoking the lease
/// (its entries then expire with the lease); [`Store::stop`] is the clean way out.
pub struct Store {
    shared: Arc<Shared>,
    marker: Marker,
    client: Arc<tokio::sync::OnceCell<Client>>,
    stop: mpsc::Sender<oneshot::Sender<()>>,
    tasks: tokio::task::JoinHandle<()>,
    _cancel: DropGuard,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("rid", &self.shared.rid)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Starts this replica's directory tasks: connect (retrying while the store is down),
    /// grant a lease, publish the replica record (with `config_hash`, see `cluster::drift`) and
    /// every route of `local`, follow everyone's entries. `reserved` admits vanity hosts
    /// (`[[ssh.reserve]]`) on read. Must be called within a Tokio runtime. Errors are about
    /// config files only.
    pub fn start(
        cfg: &ClusterConfig,
        local: Arc<dyn LocalRoutes>,
        reserved: impl Fn(&str, &KeyFingerprint) -> bool + Send + Sync + 'static,
        config_hash: String,
    ) -> Result<Self, StoreError> {
        let options = connect_options(cfg)?;
        let keys = Keys::new(&cfg.name);
        let rid = ReplicaId::new(&cfg.replica_name, rand::random());
        let reserved: Arc<Reserved> = Arc::new(reserved);
        let shared = Arc::new(Shared {
            cache: RwLock::new(Cache::new(keys.clone(), rid.clone(), reserved, MAX_ENTRIES)),
            keys,
            rid,
            timings: Timings {
                lease_ttl: cfg.lease_ttl,
                keepalive: cfg.keepalive_interval,
                request: cfg.store_timeout,
            },
            replica: Mutex::new(ReplicaEntry {
                peer_addr: cfg.peer_advertise,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                state: ReplicaState::Serving,
                started: unix_now(),
                config_hash,
            }),
            lease: tokio::sync::watch::Sender::new(None),
            health: Mutex::new(Health::default()),
            store_back: Notify::new(),
            resyncs: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
        });
        let marker = Marker::default();
        let client = Arc::new(tokio::sync::OnceCell::new());
        let (stop, stop_rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let run = run(
            shared.clone(),
            cfg.endpoints.clone(),
            options,
            client.clone(),
            local,
            marker.clone(),
            stop_rx,
        );
        let token = cancel.clone();
        let tasks = tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = run => {}
            }
        });
        crate::metrics::cluster_store_up(false);
        tracing::info!(replica = %shared.rid, "cluster directory starting");
        Ok(Self {
            shared,
            marker,
            client,
            stop,
            tasks,
            _cancel: cancel.drop_guard(),
        })
    }

    /// This replica's id in the directory.
    pub fn rid(&self) -> &ReplicaId {
        &self.shared.rid
    }

    /// Marks hosts whose local routes changed; never waits. The registry observer holds one.
    pub fn marker(&self) -> Marker {
        self.marker.clone()
    }

    /// The cache, for routing.
    pub fn lookup(&self) -> Lookup {
        Lookup(self.shared.clone())
    }

    /// Whether the store serves this replica: keepalives answered, the directory followed.
    pub fn store_up(&self) -> bool {
        self.shared.health().up()
    }

    /// The store connection (once made) and this replica's lease as it changes: for other
    /// records kept in the store under this replica's life (ACME, `cluster::acme_store`).
    pub(crate) fn session(
        &self,
    ) -> (
        Arc<tokio::sync::OnceCell<Client>>,
        tokio::sync::watch::Receiver<Option<i64>>,
    ) {
        (self.client.clone(), self.shared.lease.subscribe())
    }

    /// The lease this replica's entries hang on, while it is believed alive.
    pub fn lease_id(&self) -> Option<i64> {
        self.shared.lease()
    }

    /// Full reads of the directory so far, for `reason` (start, compacted, gap, reconnect).
    pub fn resyncs(&self, reason: &str) -> u64 {
        let counts = self.shared.resyncs.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(reason).copied().unwrap_or(0)
    }

    /// Marks this replica draining in its record (peers put it last in pools), now and in every
    /// later republish. `false`: the store could not be told now (no lease, or no answer in
    /// `store_timeout`).
    pub async fn set_draining(&self) -> bool {
        self.put_record(|r| r.state = ReplicaState::Draining).await
    }

    /// Sets the config hash in this replica's record (after a reload changed what it covers),
    /// now and in every later republish. `false` as for [`Self::set_draining`]; the store then
    /// learns it with the next lease.
    pub async fn set_config_hash(&self, hash: String) -> bool {
        self.put_record(|r| r.config_hash = hash).await
    }

    /// Changes this replica's record and writes it under the lease. [`Lookup::changes`]
    /// followers hear of it at once, without waiting for the store to echo it.
    async fn put_record(&self, change: impl FnOnce(&mut ReplicaEntry)) -> bool {
        let record = {
            let mut replica = self.shared.replica();
            change(&mut replica);
            encode_replica(&replica)
        };
        self.shared.changed();
        let (Some(client), Some(lease), Ok(value)) = (self.client.get(), self.shared.lease(), record) else {
            return false;
        };
        let key = self.shared.keys.replica(&self.shared.rid);
        let mut kv = client.kv_client();
        let put = kv.put(key, value, Some(etcd_client::PutOptions::new().with_lease(lease)));
        matches!(
            tokio::time::timeout(self.shared.timings.request, put).await,
            Ok(Ok(_))
        )
    }

    /// Stops cleanly: marks this replica draining, then revokes its lease, so every route it
    /// published leaves every cache at once; then ends its tasks. Each step is bounded by
    /// `store_timeout`; a store that does not answer leaves the lease to expire.
    pub async fn stop(self) {
        self.set_draining().await;
        let (done, revoked) = oneshot::channel();
        if self.shared.lease().is_some() && self.stop.send(done).await.is_ok() {
            // The lease task may be waiting on a keepalive before it revokes.
            let wait = self.shared.timings.request * 2;
            if tokio::time::timeout(wait, revoked).await.is_err() {
                tracing::warn!(
                    "the cluster store did not revoke this replica's lease in time; it will expire"
                );
            }
        }
        drop(self._cancel);
        let _ = self.tasks.await;
        tracing::info!(replica = %self.shared.rid, "cluster directory stopped");
    }
}

/// Builds the client options from `[cluster]`: TLS (CA, client identity) and `user:password`.
fn connect_options(cfg: &ClusterConfig) -> Result<ConnectOptions, StoreError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(cfg.store_timeout)
        .with_keep_alive(H2_PING_INTERVAL, cfg.store_timeout)
        .with_keep_alive_while_idle(false);
    if let Some(tls) = &cfg.store_tls {
        if let Some(e) = cfg.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(StoreError::TlsWithHttp(e.clone()));
        }
        options = options.with_tls(tls_options(tls)?);
    }
    if let Some(path) = &cfg.store_auth_file {
        let (user, password) = read_auth(path)?;
        options = options.with_user(user, password).with_auto_token_refresh(true);
    }
    Ok(options)
}

fn read(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

fn tls_options(tls: &StoreTls) -> Result<TlsOptions, StoreError> {
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

/// `user:password` on the first line.
fn read_auth(path: &Path) -> Result<(String, String), StoreError> {
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
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(timings: Timings) -> Self {
        let max = BACKOFF_MAX.min(timings.keepalive);
        Self {
            next: BACKOFF_START.min(max),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START.min(self.max);
    }
}

/// Connects, then runs the lease, the publisher and the watcher until cancelled.
async fn run(
    shared: Arc<Shared>,
    endpoints: Vec<String>,
    options: ConnectOptions,
    cell: Arc<tokio::sync::OnceCell<Client>>,
    local: Arc<dyn LocalRoutes>,
    marker: Marker,
    stop: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut backoff = Backoff::new(shared.timings);
    let client = loop {
        let connect = Client::connect(&endpoints, Some(options.clone()));
        match tokio::time::timeout(shared.timings.request, connect).await {
            Ok(Ok(client)) => break client,
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot connect to the cluster store; retrying"),
            Err(_) => tracing::warn!("the cluster store did not answer in time; retrying"),
        }
        tokio::time::sleep(backoff.next()).await;
    };
    let _ = cell.set(client.clone());
    tokio::join!(
        keepalive::run(shared.clone(), client.clone(), stop),
        publish::run(shared.clone(), client.clone(), local, marker),
        watch::run(shared, client),
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(dir: &Path) -> ClusterConfig {
        ClusterConfig {
            name: "prod".into(),
            replica_name: "r1".into(),
            endpoints: vec!["http://127.0.0.1:1".into()],
            store_tls: None,
            store_auth_file: None,
            secret_file: dir.join("secret"),
            lease_ttl: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(3),
            store_timeout: Duration::from_secs(2),
            fence_after: None,
            spread: crate::config::Spread::Even,
            peer_bind: "127.0.0.1:7443".parse().unwrap(),
            peer_advertise: "127.0.0.1:7443".parse().unwrap(),
            peer_connect_timeout: Duration::from_secs(1),
            peer_tls: None,
        }
    }

    #[test]
    fn config_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        assert!(connect_options(&cfg).is_ok());
        let auth = dir.path().join("auth");
        cfg.store_auth_file = Some(auth.clone());
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "read_file");
        std::fs::write(&auth, "edgemux\n").unwrap();
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "auth_format");
        std::fs::write(&auth, "edgemux:s3cret:x\n").unwrap();
        assert_eq!(read_auth(&auth).unwrap(), ("edgemux".into(), "s3cret:x".into()));
        assert!(connect_options(&cfg).is_ok());
        cfg.store_tls = Some(StoreTls {
            ca: dir.path().join("ca.pem"),
            identity: None,
        });
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "tls_with_http");
        cfg.endpoints = vec!["https://127.0.0.1:1".into()];
        assert_eq!(connect_options(&cfg).unwrap_err().reason(), "read_file");
        std::fs::write(dir.path().join("ca.pem"), "not checked until a connection").unwrap();
        assert!(connect_options(&cfg).is_ok());
    }

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
