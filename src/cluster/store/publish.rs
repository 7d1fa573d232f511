//! The publisher, whatever the backend: republishes everything under each new lease (the
//! replica record first, then every route), then every [`COALESCE`] writes the hosts marked
//! dirty ([`Marker::mark`], which never waits) through the backend's [`PublishIo`]. A write that
//! fails leaves its hosts dirty for the next round, after a backoff.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use super::local::LocalRoutes;
use super::marker::{Marked, Marker, COALESCE};
use super::state::{Backoff, Shared};

/// A backend's writes. Each takes the marked hosts from `marker` and marks them again when it
/// fails.
pub(super) trait PublishIo: Send {
    /// Everything under the new lease `id`.
    fn republish(
        &mut self,
        shared: &Shared,
        local: &dyn LocalRoutes,
        marker: &Marker,
        id: i64,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// The dirty hosts as they are now.
    fn flush(
        &mut self,
        shared: &Shared,
        local: &dyn LocalRoutes,
        marker: &Marker,
        id: i64,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// Publishes until the task is cancelled: republishes everything under each new lease, then
/// writes dirty hosts as they come.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut io: impl PublishIo,
    local: Arc<dyn LocalRoutes>,
    marker: Marker,
) {
    let mut lease_rx = shared.lease.subscribe();
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
            io.flush(&shared, &*local, &marker, id).await
        } else {
            let done = io.republish(&shared, &*local, &marker, id).await;
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

/// The hosts a flush writes for `marked`: those marked, or (too many were marked to remember)
/// every host served here plus every host this replica has entries for in the store, so one
/// gone meanwhile is deleted.
pub(super) fn dirty_hosts(marked: &Marked, shared: &Shared, local: &dyn LocalRoutes) -> HashSet<String> {
    if !marked.all {
        return marked.hosts.clone();
    }
    let mut hosts: HashSet<String> = local.all().into_keys().collect();
    hosts.extend(shared.cache().hosts_of(&shared.rid));
    hosts
}
