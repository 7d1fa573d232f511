//! The ACME client's side of a cluster store, through [`SharedStore`]: certificates (keys
//! sealed), the per-name lock, fleet-wide budget counters, challenge answers for whichever
//! replica the CA reaches, and the account. Every failure here is "the store is down" to the
//! caller, who then falls back to what this replica has on disk.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::seal::Sealer;
use super::shared::{
    account_key, cert_key, decode_cert, decode_counter, encode_cert, encode_counter, http01_key, newer_wins,
    next_counter, tls_alpn_key, CertRecord, LockOutcome, SharedError, SharedStore, CERTS_PREFIX,
};
use crate::config::OrderLimits;
use crate::names::is_domain;
use crate::tls::certs::{parse_pem, Issued};
use crate::tls::challenge::{Fetch, Pending};

/// Challenge answers outlive any order (`ORDER_TIMEOUT`) and then go by themselves.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// Compare-and-swap attempts before a write gives up (each conflict is another replica's write).
const CAS_ATTEMPTS: usize = 5;
const HOUR: u64 = 3600;
const WEEK: u64 = 7 * 24 * 3600;

/// What a certificate record read back holds, ready to serve and to cache on disk.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) issued: Issued,
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
    pub(crate) serial: String,
}

impl Stored {
    /// Parses a chain and its key (as issued, or as cached on disk).
    pub(crate) fn new(chain_pem: String, key_pem: String) -> Result<Self, String> {
        let issued = parse_pem(chain_pem.as_bytes(), key_pem.as_bytes()).map_err(|e| e.to_string())?;
        let serial = issued
            .key
            .cert
            .first()
            .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
            .map(|(_, cert)| data_encoding::HEXLOWER.encode(cert.raw_serial()))
            .unwrap_or_default();
        Ok(Self {
            issued,
            chain_pem,
            key_pem,
            serial,
        })
    }
}

/// Which fleet budget refused an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FleetRefusal {
    Hourly,
    Weekly,
    OnDemandWeekly,
}

pub(crate) struct Fleet {
    store: Arc<dyn SharedStore>,
    sealer: Sealer,
    limits: OrderLimits,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    /// `seal_key`: derived from the cluster secret for sealing. `None` if it is not a key.
    pub(crate) fn new(store: Arc<dyn SharedStore>, seal_key: &[u8; 32], limits: OrderLimits) -> Option<Self> {
        Some(Self {
            store,
            sealer: Sealer::new(seal_key)?,
            limits,
        })
    }

    /// The certificate the store holds for `name`. A record that does not decode, open or parse
    /// is logged and treated as absent (the next order replaces it).
    pub(crate) async fn load_cert(&self, name: &str) -> Result<Option<Stored>, SharedError> {
        let key = cert_key(name);
        let Some(value) = self.store.get(&key).await? else {
            return Ok(None);
        };
        Ok(self.open_record(&key, &value))
    }

    fn open_record(&self, key: &str, value: &[u8]) -> Option<Stored> {
        let name = key.strip_prefix(CERTS_PREFIX).unwrap_or_default();
        let opened = decode_cert(value)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                let key_pem = self.sealer.open(key, &r.key_sealed).map_err(|e| e.to_string())?;
                let key_pem = String::from_utf8(key_pem).map_err(|e| e.to_string())?;
                Stored::new(r.chain_pem, key_pem)
            })
            .and_then(|s| {
                // The name is also a file name in certs_dir, and must be what the chain names.
                let named = is_domain(name) && s.issued.names.iter().any(|n| n.eq_ignore_ascii_case(name));
                named
                    .then_some(s)
                    .ok_or_else(|| "the certificate does not name its key".to_owned())
            });
        opened
            .map_err(|error| tracing::warn!(key, error, "a certificate in the cluster store is not usable"))
            .ok()
    }

    /// Every certificate in the store, for replicas that serve names they do not order.
    pub(crate) async fn list_certs(&self) -> Result<Vec<(String, Stored)>, SharedError> {
        let all = self.store.list(CERTS_PREFIX).await?;
        Ok(all
            .into_iter()
            .filter_map(|(key, value)| {
                let name = key.strip_prefix(CERTS_PREFIX)?.to_owned();
                Some((name, self.open_record(&key, &value)?))
            })
            .collect())
    }

    /// Writes a certificate unless the store holds one that expires as late or later: `true`
    /// when ours is now the stored one.
    pub(crate) async fn save_cert(&self, name: &str, stored: &Stored) -> Result<bool, SharedError> {
        let key = cert_key(name);
        let not_after = secs(stored.issued.not_after);
        let record = CertRecord {
            chain_pem: stored.chain_pem.clone(),
            key_sealed: self
                .sealer
                .seal(&key, stored.key_pem.as_bytes())
                .map_err(|e| SharedError::Store(e.to_string()))?,
            not_after,
            serial: stored.serial.clone(),
        };
        let value = encode_cert(&record).map_err(|e| SharedError::Store(e.to_string()))?;
        for _ in 0..CAS_ATTEMPTS {
            let current = self.store.get(&key).await?;
            let decoded = current.as_deref().and_then(|v| decode_cert(v).ok());
            if current.is_some() && decoded.is_some() && !newer_wins(decoded.as_ref(), not_after) {
                return Ok(false);
            }
            if self
                .store
                .compare_and_swap(&key, current.as_deref(), value.clone())
                .await?
            {
                return Ok(true);
            }
        }
        Err(SharedError::Store(
            "the certificate kept changing under us".into(),
        ))
    }

    pub(crate) async fn lock(&self, name: &str) -> LockOutcome {
        let outcome = match self.store.lock(name).await {
            Ok(true) => LockOutcome::Acquired,
            Ok(false) => LockOutcome::Busy,
            Err(e) => {
                tracing::info!(name, error = %e, "cannot take the ACME lock");
                LockOutcome::Unavailable
            }
        };
        crate::metrics::acme_lock(match outcome {
            LockOutcome::Acquired => "acquired",
            LockOutcome::Busy => "busy",
            LockOutcome::Unavailable => "error",
        });
        outcome
    }

    pub(crate) async fn unlock(&self, name: &str) {
        if let Err(e) = self.store.unlock(name).await {
            tracing::warn!(name, error = %e, "cannot release the ACME lock; it goes with the lease");
        }
    }

    /// Takes one order from the fleet's budgets: fixed hour and week windows, counted with
    /// compare-and-swap so every replica draws on one budget.
    pub(crate) async fn take_budget(
        &self,
        on_demand: bool,
        now: SystemTime,
    ) -> Result<Result<(), FleetRefusal>, SharedError> {
        let now = secs(now);
        let mut counters = vec![
            (
                "budget/hour",
                now / HOUR,
                self.limits.orders_per_hour,
                FleetRefusal::Hourly,
            ),
            (
                "budget/week",
                now / WEEK,
                self.limits.orders_per_week,
                FleetRefusal::Weekly,
            ),
        ];
        if on_demand {
            let limit = self.limits.on_demand_orders_per_week;
            counters.push((
                "budget/on-demand-week",
                now / WEEK,
                limit,
                FleetRefusal::OnDemandWeekly,
            ));
        }
        // All are checked before any is taken; a race between the two steps only over-counts.
        for &(key, window, limit, refusal) in &counters {
            let current = self.store.get(key).await?;
            if next_counter(current.as_deref().map(decode_counter), window, limit).is_none() {
                return Ok(Err(refusal));
            }
        }
        for (key, window, limit, refusal) in counters {
            if let Err(refusal) = self.count(key, window, limit, refusal).await? {
                return Ok(Err(refusal));
            }
        }
        Ok(Ok(()))
    }

    async fn count(
        &self,
        key: &str,
        window: u64,
        limit: usize,
        refusal: FleetRefusal,
    ) -> Result<Result<(), FleetRefusal>, SharedError> {
        for _ in 0..CAS_ATTEMPTS {
            let current = self.store.get(key).await?;
            let Some(next) = next_counter(current.as_deref().map(decode_counter), window, limit) else {
                return Ok(Err(refusal));
            };
            if self
                .store
                .compare_and_swap(key, current.as_deref(), encode_counter(&next))
                .await?
            {
                return Ok(Ok(()));
            }
        }
        Err(SharedError::Store(
            "a budget counter kept changing under us".into(),
        ))
    }

    /// Publishes an answer for the replica the CA reaches, before the CA is told to validate.
    pub(crate) async fn publish(&self, pending: &Pending, answer: &str) -> Result<(), SharedError> {
        self.store
            .put_ttl(&pending_key(pending), answer.as_bytes().to_vec(), CHALLENGE_TTL)
            .await
    }

    /// The lookup the TLS and HTTP paths make on a miss (`Challenges::set_fetch`).
    pub(crate) fn fetcher(store: Arc<dyn SharedStore>) -> Fetch {
        Arc::new(move |pending: Pending| {
            let store = store.clone();
            Box::pin(async move {
                let value = store.get(&pending_key(&pending)).await.ok()??;
                let answer = String::from_utf8(value).ok()?;
                tracing::info!(?pending, "challenge answer found in the cluster store");
                Some(answer)
            })
        })
    }

    pub(crate) fn store(&self) -> Arc<dyn SharedStore> {
        self.store.clone()
    }

    /// The account credentials (JSON) kept for `directory_hash`, opened.
    pub(crate) async fn load_account(&self, directory_hash: &str) -> Result<Option<String>, SharedError> {
        let key = account_key(directory_hash);
        let Some(value) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let opened = String::from_utf8(value)
            .ok()
            .and_then(|sealed| self.sealer.open(&key, &sealed).ok())
            .and_then(|plain| String::from_utf8(plain).ok());
        if opened.is_none() {
            tracing::warn!(
                key,
                "the ACME account in the cluster store does not open; ignored"
            );
        }
        Ok(opened)
    }

    /// Keeps the account for every replica, unless one was stored meanwhile (`false`: use it).
    pub(crate) async fn save_account(&self, directory_hash: &str, json: &str) -> Result<bool, SharedError> {
        let key = account_key(directory_hash);
        let sealed = self
            .sealer
            .seal(&key, json.as_bytes())
            .map_err(|e| SharedError::Store(e.to_string()))?;
        self.store.compare_and_swap(&key, None, sealed.into_bytes()).await
    }
}

pub(super) fn pending_key(pending: &Pending) -> String {
    match pending {
        Pending::Http01(token) => http01_key(token),
        Pending::TlsAlpn01(name) => tls_alpn_key(name),
    }
}

pub(crate) fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
