//! [`Store`]: this replica's part in the directory, the same API whichever backend holds it.
//! `[cluster]` picks the backend (`config::StoreKind`); the backend's tasks (lease, publisher,
//! watcher) fill the shared state of `state`, and the store reads it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::cache::{Cache, MAX_ENTRIES};
use super::entry::{encode_replica, Keys, ReplicaEntry, ReplicaId, ReplicaState, Reserved};
use super::local::{unix_now, LocalRoutes};
use super::marker::Marker;
use super::state::{Health, Lookup, Parts, RecordWriter, Shared, Started, StoreError, Timings};
use crate::acme::shared::SharedStore;
use crate::config::{ClusterConfig, StoreKind};
use crate::names::KeyFingerprint;

/// Starts the backend `[cluster]` names. Errors: its config files, or a backend not built in.
#[allow(unreachable_code, unused_variables)]
fn start_backend(
    cfg: &ClusterConfig,
    parts: Parts,
    stop: mpsc::Receiver<oneshot::Sender<()>>,
) -> Result<Started, StoreError> {
    match cfg.store {
        StoreKind::Etcd => {
            #[cfg(feature = "etcd")]
            return super::etcd::start(cfg, parts, stop);
            Err(StoreError::NotBuilt("etcd"))
        }
        StoreKind::Redis => {
            #[cfg(feature = "redis")]
            return super::redis::start(cfg, parts, stop);
            Err(StoreError::NotBuilt("redis"))
        }
    }
}

/// This replica's part in the directory. Dropping it stops its tasks without revoking the lease
/// (its entries then expire with the lease); [`Store::stop`] is the clean way out.
pub struct Store {
    shared: Arc<Shared>,
    marker: Marker,
    /// Writes this replica's record in the backend's store.
    writer: Box<dyn RecordWriter>,
    /// The ACME state in the backend's store.
    acme: Arc<dyn SharedStore>,
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
        let (stop, stop_rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let (writer, acme, run) = start_backend(cfg, (shared.clone(), local, marker.clone()), stop_rx)?;
        // Before the tasks run: the gauge follows their changes of health only, so setting it
        // after them could hide a store they already found up.
        crate::metrics::cluster_store_up(false);
        let token = cancel.clone();
        let tasks = tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = run => {}
            }
        });
        tracing::info!(replica = %shared.rid, store = cfg.store.as_str(), "cluster directory starting");
        Ok(Self {
            shared,
            marker,
            writer,
            acme,
            stop,
            tasks,
            _cancel: cancel.drop_guard(),
        })
    }

    /// The ACME client's view of the store: locks under this replica's life, certificates,
    /// challenge answers, budgets (`acme::shared`).
    pub(crate) fn acme(&self) -> Arc<dyn SharedStore> {
        self.acme.clone()
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
        let (Some(lease), Ok(value)) = (self.shared.lease(), record) else {
            return false;
        };
        self.writer.put_record(&self.shared, lease, value).await
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
