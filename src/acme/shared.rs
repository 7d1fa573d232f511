//! ACME state shared by the replicas of a cluster (SCALEOUT §7): the seam a store backend
//! implements ([`SharedStore`], a handful of primitives), the values kept under the cluster's
//! `acme/` prefix with the checks a value read back passes, and the pure decisions (take the
//! lock or not, order without it, which certificate wins, whether a fleet budget allows another
//! order). No I/O here; `fleet` does it through the trait.
//!
//! ```text
//! acme/account/<directory hash>            sealed account credentials        no lease
//! acme/certs/<name>                        {chain_pem,key_sealed,not_after,serial}
//! acme/locks/<name>                        holder replica id                 holder's lease
//! acme/challenges/http-01/<token>          key authorization                 10 min
//! acme/challenges/tls-alpn-01/<name>       hex SHA-256 of the key authorization   10 min
//! acme/budget/<hour|week|on-demand-week>   {window,count}                    no lease
//! ```

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A certificate record holds a chain (Let's Encrypt's is about 4 KiB with its intermediate)
/// and a sealed key; anything much larger is not one of ours.
pub(crate) const MAX_CERT_VALUE: usize = 64 * 1024;
/// A budget counter is two numbers.
pub(crate) const MAX_COUNTER_VALUE: usize = 256;
/// Below this much validity left, a replica that cannot reach the store orders without the lock
/// (SCALEOUT §7 `renew_deadline`): at worst every replica orders once, far below CA limits.
pub(crate) const RENEW_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why the store did not do what was asked; every such failure counts as the store being down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SharedError {
    #[error("the cluster store is not connected or this replica holds no lease")]
    NotConnected,
    #[error("the cluster store did not answer in time")]
    Timeout,
    #[error("the cluster store: {0}")]
    Store(String),
}

pub(crate) type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SharedError>> + Send + 'a>>;

/// What ACME needs from a cluster store. Keys are relative to the cluster's `acme/` prefix;
/// every call is bounded by the backend's request timeout. A backend needs: a read, a write
/// with an expiry, a delete, a compare-and-swap on one key, a list by prefix, and a lock bound
/// to this replica's life (etcd: a transaction under the replica's lease; Redis: `SET NX PX`
/// with the replica id as the token).
pub(crate) trait SharedStore: Send + Sync {
    /// The value at `key`, or `None` when there is none.
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;
    /// Writes `value` at `key`, gone by itself after `ttl`.
    fn put_ttl<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl: Duration) -> StoreFuture<'a, ()>;
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;
    /// Writes `value` (kept until replaced) if `key` holds exactly `expected` now (`None`: no
    /// value); `false` when it held something else and nothing was written.
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, bool>;
    /// Every key under `prefix` with its value, keys relative as given.
    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<(String, Vec<u8>)>>;
    /// Takes `locks/<name>` for this replica unless another holds it: `true` when this replica
    /// holds it now. Released by [`Self::unlock`], or when this replica dies.
    fn lock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, bool>;
    /// Releases `locks/<name>` if this replica still holds it.
    fn unlock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()>;
}

pub(crate) fn cert_key(name: &str) -> String {
    format!("certs/{name}")
}

pub(crate) const CERTS_PREFIX: &str = "certs/";

pub(crate) fn http01_key(token: &str) -> String {
    format!("challenges/http-01/{token}")
}

pub(crate) fn tls_alpn_key(name: &str) -> String {
    format!("challenges/tls-alpn-01/{}", name.to_ascii_lowercase())
}

pub(crate) fn account_key(directory_hash: &str) -> String {
    format!("account/{directory_hash}")
}

/// Why a value read from the store was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("the value is too large")]
    TooLarge,
    #[error("the value is not a valid record")]
    Malformed,
}

/// `certs/<name>`: an issued certificate, its key sealed under the store key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CertRecord {
    pub(crate) chain_pem: String,
    pub(crate) key_sealed: String,
    /// Seconds since the Unix epoch: the newer record wins.
    pub(crate) not_after: u64,
    /// Hex of the leaf's serial number, for logs.
    pub(crate) serial: String,
}

pub(crate) fn encode_cert(record: &CertRecord) -> Result<Vec<u8>, RecordError> {
    let out = serde_json::to_vec(record).map_err(|_| RecordError::Malformed)?;
    if out.len() > MAX_CERT_VALUE {
        return Err(RecordError::TooLarge);
    }
    Ok(out)
}

/// A certificate record, checked for size and shape (the chain is parsed when it is used).
pub(crate) fn decode_cert(value: &[u8]) -> Result<CertRecord, RecordError> {
    if value.len() > MAX_CERT_VALUE {
        return Err(RecordError::TooLarge);
    }
    let record: CertRecord = serde_json::from_slice(value).map_err(|_| RecordError::Malformed)?;
    let serial_ok = record.serial.len() <= 64 && record.serial.bytes().all(|b| b.is_ascii_hexdigit());
    if !serial_ok || !record.chain_pem.starts_with("-----BEGIN CERTIFICATE-----") {
        return Err(RecordError::Malformed);
    }
    Ok(record)
}

/// `budget/<counter>`: orders placed fleet-wide in one fixed window (hour or week number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Counter {
    pub(crate) window: u64,
    pub(crate) count: u32,
}

pub(crate) fn encode_counter(counter: &Counter) -> Vec<u8> {
    serde_json::to_vec(counter).unwrap_or_default()
}

pub(crate) fn decode_counter(value: &[u8]) -> Result<Counter, RecordError> {
    if value.len() > MAX_COUNTER_VALUE {
        return Err(RecordError::TooLarge);
    }
    serde_json::from_slice(value).map_err(|_| RecordError::Malformed)
}

/// The counter after one more order in `window`, or `None` when `limit` orders were placed in
/// it already. A counter of an older window starts over; one that does not parse counts as
/// full, so a poisoned counter stops orders rather than lifting the limit.
pub(crate) fn next_counter(
    current: Option<Result<Counter, RecordError>>,
    window: u64,
    limit: usize,
) -> Option<Counter> {
    let count = match current {
        None => 0,
        Some(Ok(c)) if c.window != window => 0,
        Some(Ok(c)) => c.count,
        Some(Err(_)) => return None,
    };
    if usize::try_from(count).ok()? >= limit {
        return None;
    }
    Some(Counter {
        window,
        count: count.checked_add(1)?,
    })
}

/// What became of asking for a name's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockOutcome {
    Acquired,
    /// Another replica holds it: it is ordering this name now.
    Busy,
    /// The store did not answer: nobody can know who orders.
    Unavailable,
}

/// What a replica due to renew a name does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Order: under the lock, or (`locked: false`) without it, the deadline being near.
    Order { locked: bool },
    /// Another replica orders: wait for its certificate in the store.
    WaitForHolder,
    /// No lock and time enough left: try again later; never a duplicate order.
    Defer,
}

/// No lock, no order, unless fewer than [`RENEW_DEADLINE`] of validity are left (`left`: none
/// at all when there is no certificate).
pub(crate) fn decide(lock: LockOutcome, left: Duration) -> Decision {
    match lock {
        LockOutcome::Acquired => Decision::Order { locked: true },
        LockOutcome::Busy => Decision::WaitForHolder,
        LockOutcome::Unavailable if left < RENEW_DEADLINE => Decision::Order { locked: false },
        LockOutcome::Unavailable => Decision::Defer,
    }
}

/// Whether a record with `ours` (not_after) replaces the stored one: only a newer one does, so
/// two replicas writing at once never roll a certificate back.
pub(crate) fn newer_wins(stored: Option<&CertRecord>, ours: u64) -> bool {
    stored.is_none_or(|s| s.not_after < ours)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn record(not_after: u64) -> CertRecord {
        CertRecord {
            chain_pem: "-----BEGIN CERTIFICATE-----\n".into(),
            key_sealed: "AAAA".into(),
            not_after,
            serial: "01ab".into(),
        }
    }

    #[test]
    fn no_lock_no_order_until_the_deadline() {
        assert_eq!(
            decide(LockOutcome::Acquired, DAY * 30),
            Decision::Order { locked: true }
        );
        assert_eq!(decide(LockOutcome::Busy, DAY * 30), Decision::WaitForHolder);
        assert_eq!(decide(LockOutcome::Busy, Duration::ZERO), Decision::WaitForHolder);
        assert_eq!(decide(LockOutcome::Unavailable, DAY * 30), Decision::Defer);
        assert_eq!(decide(LockOutcome::Unavailable, DAY * 7), Decision::Defer);
        assert_eq!(
            decide(LockOutcome::Unavailable, DAY * 6),
            Decision::Order { locked: false }
        );
        assert_eq!(
            decide(LockOutcome::Unavailable, Duration::ZERO),
            Decision::Order { locked: false },
            "no certificate at all"
        );
    }

    #[test]
    fn a_newer_certificate_wins() {
        assert!(newer_wins(None, 10));
        assert!(newer_wins(Some(&record(9)), 10));
        assert!(!newer_wins(Some(&record(10)), 10));
        assert!(!newer_wins(Some(&record(11)), 10));
    }

    #[test]
    fn counters_count_per_window_and_refuse_at_the_limit() {
        assert_eq!(next_counter(None, 5, 2), Some(Counter { window: 5, count: 1 }));
        let one = Counter { window: 5, count: 1 };
        assert_eq!(
            next_counter(Some(Ok(one)), 5, 2),
            Some(Counter { window: 5, count: 2 })
        );
        let two = Counter { window: 5, count: 2 };
        assert_eq!(next_counter(Some(Ok(two)), 5, 2), None);
        assert_eq!(
            next_counter(Some(Ok(two)), 6, 2),
            Some(Counter { window: 6, count: 1 })
        );
        assert_eq!(next_counter(Some(Err(RecordError::Malformed)), 6, 2), None);
        assert_eq!(next_counter(None, 6, 0), None);
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let r = record(1_900_000_000);
        assert_eq!(decode_cert(&encode_cert(&r).unwrap()).unwrap(), r);
        assert_eq!(decode_cert(b"{}"), Err(RecordError::Malformed));
        let mut bad = r.clone();
        bad.serial = "zz".into();
        assert_eq!(
            decode_cert(&serde_json::to_vec(&bad).unwrap()),
            Err(RecordError::Malformed)
        );
        assert_eq!(
            decode_cert(&vec![b' '; MAX_CERT_VALUE + 1]),
            Err(RecordError::TooLarge)
        );
        let c = Counter { window: 1, count: 2 };
        assert_eq!(decode_counter(&encode_counter(&c)).unwrap(), c);
        assert_eq!(decode_counter(b"{\"window\":1}"), Err(RecordError::Malformed));
    }
}
