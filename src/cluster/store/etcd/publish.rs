//! The publisher's writes on etcd (`store::publish` runs them): this replica's routes into the
//! store, under its lease. Each round reads the local state of the dirty hosts and writes each
//! one (a put under the lease, or a delete), in transactions of at most [`MAX_TXN_OPS`]. A new lease republishes everything: the replica
//! record first, then every route. A write that fails leaves its hosts dirty for the next round.

use etcd_client::{Client, KvClient, PutOptions, Txn, TxnOp};

use super::Shared;
use crate::cluster::store::entry::{encode_replica, encode_route, EntryError, RouteEntry};
use crate::cluster::store::local::LocalRoutes;
use crate::cluster::store::marker::Marker;
use crate::cluster::store::publish::{dirty_hosts, PublishIo};

/// etcd refuses a transaction of more operations than `--max-txn-ops` (128 by default).
const MAX_TXN_OPS: usize = 128;

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

/// The publisher's writes on etcd.
pub(super) struct EtcdPublish(KvClient);

impl EtcdPublish {
    pub(super) fn new(client: &Client) -> Self {
        Self(client.kv_client())
    }
}

impl PublishIo for EtcdPublish {
    async fn republish(
        &mut self,
        shared: &Shared,
        local: &dyn LocalRoutes,
        marker: &Marker,
        id: i64,
    ) -> Result<(), String> {
        republish(shared, &mut self.0, local, marker, id)
            .await
            .map_err(|e| e.to_string())
    }

    async fn flush(
        &mut self,
        shared: &Shared,
        local: &dyn LocalRoutes,
        marker: &Marker,
        id: i64,
    ) -> Result<(), String> {
        flush(shared, &mut self.0, local, marker, id)
            .await
            .map_err(|e| e.to_string())
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
    let hosts = dirty_hosts(&marked, shared, local);
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
