//! The ACME seam (`acme::shared::SharedStore`) on etcd: keys under `<prefix><cluster>/acme/`,
//! each call bounded by `store_timeout`. The lock is a transaction that creates `locks/<name>`
//! under this replica's lease with its replica id as the value, if the key does not exist; it
//! is released by deleting it if the value is still ours, or by the lease running out when the
//! replica dies. Values with an expiry get a lease of their own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, KvClient, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{watch, OnceCell};

use crate::acme::shared::{SharedError, SharedStore, StoreFuture};

/// At most this many keys in one list: the certificates of the configured domains and of
/// tunnel hosts (each on-demand one took an order from a budget of tens a week).
const MAX_LIST: i64 = 4096;

/// This replica's ACME view of etcd.
pub(super) struct EtcdAcme {
    client: Arc<OnceCell<Client>>,
    lease: watch::Receiver<Option<i64>>,
    /// `<prefix><cluster>/acme/`.
    root: String,
    /// The lock value: this replica's id, incarnation included.
    rid: String,
    timeout: Duration,
}

impl EtcdAcme {
    pub(super) fn new(
        (client, lease): (Arc<OnceCell<Client>>, watch::Receiver<Option<i64>>),
        root: String,
        rid: String,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            lease,
            root,
            rid,
            timeout,
        }
    }

    fn kv(&self) -> Result<KvClient, SharedError> {
        self.client
            .get()
            .map(Client::kv_client)
            .ok_or(SharedError::NotConnected)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, SharedError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(SharedError::Store(e.to_string())),
            Err(_) => Err(SharedError::Timeout),
        }
    }

    async fn get_inner(&self, key: &str) -> Result<Option<Vec<u8>>, SharedError> {
        let mut kv = self.kv()?;
        let got = self.timed(kv.get(self.key(key), None)).await?;
        Ok(got.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put_ttl_inner(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), SharedError> {
        let client = self.client.get().ok_or(SharedError::NotConnected)?;
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut leases = client.lease_client();
        let lease = self.timed(leases.grant(ttl, None)).await?.id();
        let mut kv = client.kv_client();
        let options = PutOptions::new().with_lease(lease);
        self.timed(kv.put(self.key(key), value, Some(options))).await?;
        Ok(())
    }

    async fn cas_inner(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
    ) -> Result<bool, SharedError> {
        let mut kv = self.kv()?;
        let full = self.key(key);
        let compare = match expected {
            None => Compare::version(full.clone(), CompareOp::Equal, 0),
            Some(v) => Compare::value(full.clone(), CompareOp::Equal, v.to_vec()),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(full, value, None)]);
        Ok(self.timed(kv.txn(txn)).await?.succeeded())
    }

    async fn list_inner(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, SharedError> {
        let mut kv = self.kv()?;
        let options = GetOptions::new().with_prefix().with_limit(MAX_LIST);
        let got = self.timed(kv.get(self.key(prefix), Some(options))).await?;
        Ok(got
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&self.root)?;
                Some((key.to_owned(), kv.value().to_vec()))
            })
            .collect())
    }

    async fn lock_inner(&self, name: &str) -> Result<bool, SharedError> {
        let lease = (*self.lease.borrow()).ok_or(SharedError::NotConnected)?;
        let mut kv = self.kv()?;
        let key = self.key(&format!("locks/{name}"));
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.rid.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let done = self.timed(kv.txn(txn)).await?;
        if done.succeeded() {
            return Ok(true);
        }
        // Held already: by this very replica (a lock it did not get to release) or another.
        let ours = done.op_responses().iter().any(|r| match r {
            TxnOpResponse::Get(got) => got.kvs().iter().any(|kv| kv.value() == self.rid.as_bytes()),
            _ => false,
        });
        Ok(ours)
    }

    async fn unlock_inner(&self, name: &str) -> Result<(), SharedError> {
        let mut kv = self.kv()?;
        let key = self.key(&format!("locks/{name}"));
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, self.rid.clone())])
            .and_then([TxnOp::delete(key, None)]);
        self.timed(kv.txn(txn)).await?;
        Ok(())
    }
}

impl SharedStore for EtcdAcme {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(self.get_inner(key))
    }

    fn put_ttl<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(self.put_ttl_inner(key, value, ttl))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut kv = self.kv()?;
            self.timed(kv.delete(self.key(key), None)).await?;
            Ok(())
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, bool> {
        Box::pin(self.cas_inner(key, expected, value))
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
