//! The publisher: this replica's routes into the store, under its lease. Callers only mark hosts
//! dirty ([`Marker::mark`], which never waits); every [`COALESCE`] the publisher reads the local
//! state of the dirty hosts and writes each one (a put under the lease, or a delete), in
//! transactions of at most [`MAX_TXN_OPS`]. A new lease republishes everything: the replica
//! record first, then every route. A write that fails leaves its hosts dirty for the next round.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{Client, KvClient, PutOptions, Txn, TxnOp};
use tokio::sync::Notify;

use super::{Backoff, Shared};
use crate::cluster::store::cache::MAX_ENTRIES;
use crate::cluster::store::entry::{encode_replica, encode_route, EntryError, RouteEntry};
use crate::cluster::store::local::LocalRoutes;

/// How long changes gather before a write (SCALEOUT §3.3): a client that opens ten forwards at
/// once costs one write, and a visitor on another replica waits well under a second.
const COALESCE: Duration = Duration::from_millis(50);
/// etcd refuses a transaction of more operations than `--max-txn-ops` (128 by default).
const MAX_TXN_OPS: usize = 128;
/// Dirty hosts remembered one by one. Past this many (a long store outage with much churn) the
/// publisher forgets them and reconciles everything instead: every local route, and every entry
/// of its own that the cache holds.
const MAX_DIRTY: usize = MAX_ENTRIES;

/// Marks hosts whose local routes changed. Cheap to clone; never blocks on the store.
#[derive(Clone, Default)]
pub struct Marker(Arc<Dirty>);

#[derive(Default)]
struct Dirty {
    marked: Mutex<Marked>,
    notify: Notify,
}

#[derive(Default)]
struct Marked {
    hosts: HashSet<String>,
    /// Too many to remember: reconcile every host.
    all: bool,
}

impl std::fmt::Debug for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Marker")
    }
}

impl Marker {
    /// `host`'s local routes changed: publish it at the next round.
    pub fn mark(&self, host: &str) {
        self.lock().add(host);
        self.0.notify.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, Marked> {
        self.0.marked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Marked {
        std::mem::take(&mut *self.lock())
    }

    /// Marks again what a failed write did not get through.
    fn restore(&self, marked: Marked) {
        {
            let mut current = self.lock();
            current.all |= marked.all;
            for host in &marked.hosts {
                current.add(host);
            }
        }
        self.0.notify.notify_one();
    }

    async fn dirty(&self) {
        self.0.notify.notified().await;
    }
}

impl Marked {
    fn add(&mut self, host: &str) {
        if self.all || self.hosts.contains(host) {
            return;
        }
        if self.hosts.len() >= MAX_DIRTY {
            self.hosts = HashSet::new();
            self.all = true;
            return;
        }
        self.hosts.insert(host.to_owned());
    }
}

/// Why a write did not get through.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Store(#[from] etcd_client::Error),
    #[error("no answer in time")]
    Timeout,
    #[error("the replica record: {0}")]
    Record(EntryError),
}

/// Publishes until the task is cancelled: republishes everything under each new lease, then
/// writes dirty hosts as they come.
pub(super) async fn run(shared: Arc<Shared>, client: Client, local: Arc<dyn LocalRoutes>, marker: Marker) {
    let mut lease_rx = shared.lease.subscribe();
    let mut kv = client.kv_client();
    let mut published: Option<i64> = None;
    let mut backoff = Backoff::new(shared.timings);
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
            flush(&shared, &mut kv, &*local, &marker, id).await
        } else {
            let done = republish(&shared, &mut kv, &*local, &marker, id).await;
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

/// Everything under a new lease: the replica record, every local route, and a delete for each
/// marked host no longer served (a previous try may have written it under this lease).
async fn republish(
    shared: &Shared,
    kv: &mut KvClient,
    local: &dyn LocalRoutes,
    marker: &Marker,
    lease: i64,
) -> Result<(), WriteError> {
    let marked = marker.take();
    let record = encode_replica(&shared.replica()).map_err(WriteError::Record);
    let record = match record {
        Ok(r) => r,
        Err(e) => {
            marker.restore(marked);
            return Err(e);
        }
    };
    let all = local.all();
    let mut ops = vec![TxnOp::put(
        shared.keys.replica(&shared.rid),
        record,
        Some(PutOptions::new().with_lease(lease)),
    )];
    ops.extend(
        all.iter()
            .map(|(host, entry)| route_op(shared, host, Some(entry), lease)),
    );
    let mut gone = marked.hosts.clone();
    if marked.all {
        gone.extend(shared.cache().hosts_of(&shared.rid));
    }
    ops.extend(
        gone.iter()
            .filter(|h| !all.contains_key(*h))
            .map(|h| route_op(shared, h, None, lease)),
    );
    write(shared, kv, ops)
        .await
        .inspect_err(|_| marker.restore(marked))
}

/// The dirty hosts as they are now.
async fn flush(
    shared: &Shared,
    kv: &mut KvClient,
    local: &dyn LocalRoutes,
    marker: &Marker,
    lease: i64,
) -> Result<(), WriteError> {
    let marked = marker.take();
    let hosts: HashSet<String> = if marked.all {
        let mut hosts: HashSet<String> = local.all().into_keys().collect();
        hosts.extend(shared.cache().hosts_of(&shared.rid));
        hosts
    } else {
        marked.hosts.clone()
    };
    if hosts.is_empty() {
        return Ok(());
    }
    let routes = local.routes(&hosts);
    let ops = hosts
        .iter()
        .map(|h| route_op(shared, h, routes.get(h), lease))
        .collect();
    write(shared, kv, ops)
        .await
        .inspect_err(|_| marker.restore(marked))
}

/// A put of `host`'s route under the lease, or its delete when it is not served here (or does
/// not fit a value).
fn route_op(shared: &Shared, host: &str, entry: Option<&RouteEntry>, lease: i64) -> TxnOp {
    let key = shared.keys.route(host, &shared.rid);
    match entry.map(encode_route) {
        Some(Ok(value)) => TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease))),
        Some(Err(e)) => {
            crate::metrics::cluster_dropped_entry(e.reason());
            tracing::warn!(%host, error = %e, "the host's routes do not fit a directory entry; other replicas will not find it");
            TxnOp::delete(key, None)
        }
        None => TxnOp::delete(key, None),
    }
}

/// Runs `ops` in order, in transactions of at most [`MAX_TXN_OPS`].
async fn write(shared: &Shared, kv: &mut KvClient, ops: Vec<TxnOp>) -> Result<(), WriteError> {
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let batch: Vec<TxnOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
        let txn = kv.txn(Txn::new().and_then(batch));
        tokio::time::timeout(shared.timings.request, txn)
            .await
            .map_err(|_| WriteError::Timeout)??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_coalesce_and_overflow_into_a_reconcile() {
        let marker = Marker::default();
        marker.mark("a");
        marker.mark("a");
        marker.mark("b");
        let taken = marker.take();
        assert_eq!((taken.hosts.len(), taken.all), (2, false));
        assert!(marker.take().hosts.is_empty(), "taking clears");
        marker.restore(taken);
        assert_eq!(
            marker.take().hosts.len(),
            2,
            "a failed write marks its hosts again"
        );
        let mut marked = Marked::default();
        for i in 0..=MAX_DIRTY {
            marked.add(&i.to_string());
        }
        assert!(
            marked.all && marked.hosts.is_empty(),
            "bounded: past the cap, reconcile all"
        );
        marked.add("more");
        assert!(marked.hosts.is_empty());
    }
}
