//! Keeping one name valid for as long as it is managed: what is in service (disk, and in a
//! cluster the store: the newer wins and the other side is brought level), when to renew, and
//! whether this replica may order now (`shared::decide`: under the name's lock; without it only
//! near expiry). A failed renewal never removes the certificate in service.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::fleet::{secs, Fleet, Stored};
use super::schedule;
use super::shared::{decide, Decision, LockOutcome, RENEW_DEADLINE};
use super::{AcmeError, AcmeManager};
use crate::tls::certs::Issued;
use crate::tunnels::{Route, TunnelKey};

/// How long one order may take end to end before it counts as failed.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// A replica that could not take the lock (store down) looks again this often, or at once when
/// a renewal is forced.
const DEFER_RETRY: Duration = Duration::from_secs(60);
/// While another replica holds the lock, the store is read this often for its certificate...
const HOLDER_POLL: Duration = Duration::from_secs(1);
/// ...for as long as its order may take.
const HOLDER_WAIT: Duration = Duration::from_secs(190);
/// How long a replica near expiry keeps asking for the lock before it orders without it.
const LOCK_GRACE: Duration = Duration::from_secs(15);
/// A budget that refused is asked again after this.
const BUDGET_RETRY: Duration = Duration::from_secs(3600);

/// Whether this replica may order now.
enum Clearance {
    Order {
        locked: bool,
    },
    /// The store has a newer certificate now: start over with it.
    Again,
    Wait(Duration),
}

/// Counts a lock held in `edgemux_acme_locks_held` while alive.
struct Held(bool);

impl Held {
    fn new(on_demand: bool) -> Self {
        crate::metrics::acme_lock_held(on_demand, true);
        Self(on_demand)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        crate::metrics::acme_lock_held(self.0, false);
    }
}

impl AcmeManager {
    /// Keeps one domain's certificate valid for as long as it is managed.
    pub(super) async fn manage(&self, domain: &str, on_demand: bool) {
        let mut renew_rx = self.renew_now.subscribe();
        renew_rx.borrow_and_update();
        let mut failures = 0u32;
        let mut forced = false;
        loop {
            let now = SystemTime::now();
            let current = self.current(domain, now).await;
            let due = match (&current, forced) {
                (Some(issued), false) => self.renewal_time(issued).await,
                _ => now,
            };
            if let Ok(wait) = due.duration_since(SystemTime::now()) {
                tracing::info!(
                    domain,
                    in_secs = wait.as_secs(),
                    "next certificate renewal scheduled"
                );
                forced = wait_or_forced(wait, &mut renew_rx).await;
                continue;
            }
            forced = false;
            if on_demand && !self.tunnel_exists(domain) {
                tracing::info!(domain, "tunnel is gone: its certificate is no longer renewed");
                crate::metrics::cert_abandoned(domain);
                return;
            }
            let locked = match self.clearance(domain, current.as_ref()).await {
                Clearance::Order { locked } => locked,
                Clearance::Again => continue,
                Clearance::Wait(wait) => {
                    forced = wait_or_forced(wait, &mut renew_rx).await;
                    continue;
                }
            };
            let held = locked.then(|| Held::new(on_demand));
            let wait = self
                .budgeted_order(domain, on_demand, locked, &mut failures)
                .await;
            if let (Some(fleet), Some(_)) = (&self.fleet, &held) {
                fleet.unlock(domain).await;
            }
            drop(held);
            if let Some(wait) = wait {
                forced = wait_or_forced(wait, &mut renew_rx).await;
            }
        }
    }

    /// Takes the budgets and orders; the wait before the next try, if the order did not
    /// succeed. The result goes to the store before the caller releases the lock, so a replica
    /// waiting for it finds it.
    async fn budgeted_order(
        &self,
        domain: &str,
        on_demand: bool,
        locked: bool,
        failures: &mut u32,
    ) -> Option<Duration> {
        if let Err(refusal) = self.take_budget(domain, on_demand, locked).await {
            tracing::warn!(domain, refusal, "ACME order budget exhausted; waiting");
            crate::metrics::acme_order("budget");
            return Some(BUDGET_RETRY);
        }
        let result = match tokio::time::timeout(ORDER_TIMEOUT, self.order(domain)).await {
            Ok(result) => result,
            Err(_) => Err(AcmeError::Timeout(ORDER_TIMEOUT)),
        };
        match result {
            Ok(stored) => {
                *failures = 0;
                crate::metrics::acme_order("ok");
                self.install(domain, &stored.issued);
                self.share(domain, &stored).await;
                tracing::info!(
                    domain,
                    serial = stored.serial,
                    "certificate issued and in service"
                );
                None
            }
            Err(error) => {
                *failures += 1;
                crate::metrics::acme_order("failed");
                self.budget_lock().record_failure(domain, SystemTime::now());
                let delay = schedule::backoff(*failures, rand::random::<f64>());
                tracing::warn!(
                    domain,
                    failures = *failures,
                    retry_in_secs = delay.as_secs(),
                    error = %error,
                    "ACME order failed; the current certificate stays in service"
                );
                Some(delay)
            }
        }
    }

    /// What is in service for `domain`, installed: the disk's certificate, or in a cluster the
    /// store's when it is newer (then cached on disk). A newer one on disk goes to the store.
    async fn current(&self, domain: &str, now: SystemTime) -> Option<Issued> {
        let disk = self.store.load_cert(domain, now);
        // In service at once, before the store is asked (a restart must not wait for it).
        if let Some(issued) = &disk {
            self.install(domain, issued);
        }
        let Some(fleet) = &self.fleet else {
            return disk;
        };
        let disk_after = disk.as_ref().map_or(0, |i| secs(i.not_after));
        match fleet.load_cert(domain).await {
            Ok(Some(stored))
                if secs(stored.issued.not_after) > disk_after && stored.issued.not_after > now =>
            {
                self.adopt(domain, &stored);
                return Some(stored.issued);
            }
            Ok(stored)
                if disk.is_some()
                    && stored
                        .as_ref()
                        .is_none_or(|s| secs(s.issued.not_after) < disk_after) =>
            {
                let pem = self.store.load_pem(domain).map(|(c, k)| Stored::new(c, k));
                if let Some(Ok(ours)) = pem {
                    self.share(domain, &ours).await;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(domain, error = %e, "cluster store unavailable: serving from disk"),
        }
        disk
    }

    /// Takes a certificate another replica ordered: on disk (so a restart serves it without the
    /// store), then in service.
    pub(super) fn adopt(&self, domain: &str, stored: &Stored) {
        if let Err(e) = self.store.save_cert(domain, &stored.chain_pem, &stored.key_pem) {
            tracing::warn!(domain, error = %e, "cannot cache the cluster's certificate on disk");
        }
        self.install(domain, &stored.issued);
        crate::metrics::acme_adopted();
        tracing::info!(
            domain,
            serial = stored.serial,
            "certificate taken from the cluster store and in service"
        );
    }

    /// Writes our certificate to the store (a newer one there wins); on failure the disk keeps
    /// it, and the next pass of the loop tries again.
    async fn share(&self, domain: &str, stored: &Stored) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        match fleet.save_cert(domain, stored).await {
            Ok(true) => tracing::info!(
                domain,
                serial = stored.serial,
                "certificate written to the cluster store"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(domain, error = %e, "certificate not written to the cluster store"),
        }
    }

    /// Whether this replica orders now (see `shared::decide`). Under the lock, the store is read
    /// again: another replica may have just renewed.
    async fn clearance(&self, domain: &str, current: Option<&Issued>) -> Clearance {
        let Some(fleet) = &self.fleet else {
            return Clearance::Order { locked: false };
        };
        let now = SystemTime::now();
        let left = current
            .and_then(|i| i.not_after.duration_since(now).ok())
            .unwrap_or_default();
        let had = current.map_or(0, |i| secs(i.not_after));
        let mut lock = fleet.lock(domain).await;
        let asked = tokio::time::Instant::now();
        // A store still connecting (a replica just started) or one that blinked is not yet a
        // reason to order without the lock.
        while lock == LockOutcome::Unavailable && left < RENEW_DEADLINE && asked.elapsed() < LOCK_GRACE {
            tokio::time::sleep(HOLDER_POLL).await;
            lock = fleet.lock(domain).await;
        }
        match decide(lock, left) {
            Decision::Order { locked: true } => {
                if newer_in_store(fleet, domain, had).await {
                    fleet.unlock(domain).await;
                    tracing::info!(domain, "renewed by another replica meanwhile: no order");
                    return Clearance::Again;
                }
                Clearance::Order { locked: true }
            }
            Decision::Order { locked: false } => {
                tracing::warn!(
                    domain,
                    left_secs = left.as_secs(),
                    "cluster store unavailable and the certificate is near expiry: ordering without the lock"
                );
                Clearance::Order { locked: false }
            }
            Decision::WaitForHolder => {
                tracing::info!(
                    domain,
                    "another replica is ordering this certificate; waiting for it"
                );
                let started = tokio::time::Instant::now();
                while started.elapsed() < HOLDER_WAIT {
                    tokio::time::sleep(HOLDER_POLL).await;
                    if newer_in_store(fleet, domain, had).await {
                        return Clearance::Again;
                    }
                }
                Clearance::Wait(schedule::BACKOFF_START)
            }
            Decision::Defer => {
                crate::metrics::acme_renewal_deferred();
                tracing::warn!(
                    domain,
                    retry_in_secs = DEFER_RETRY.as_secs(),
                    "certificate renewal deferred: the cluster store cannot grant the lock (no lock, no order); the current certificate stays in service"
                );
                Clearance::Wait(DEFER_RETRY)
            }
        }
    }

    fn budget_lock(&self) -> std::sync::MutexGuard<'_, schedule::Budget> {
        self.budget.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This replica's budget, then under the lock the fleet's (a store that fails here leaves
    /// this replica's budget in force).
    async fn take_budget(&self, domain: &str, on_demand: bool, locked: bool) -> Result<(), String> {
        let now = SystemTime::now();
        self.budget_lock()
            .try_order(domain, on_demand, now)
            .map_err(|r| format!("{r:?}"))?;
        let (true, Some(fleet)) = (locked, &self.fleet) else {
            return Ok(());
        };
        match fleet.take_budget(on_demand, now).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(refusal)) => Err(format!("fleet {refusal:?}")),
            Err(e) => {
                tracing::warn!(domain, error = %e, "the fleet's ACME budget is unavailable; this replica's applies");
                Ok(())
            }
        }
    }

    fn tunnel_exists(&self, host: &str) -> bool {
        let key = TunnelKey {
            host: host.to_owned(),
            route: Route::Http,
        };
        self.tunnels.contains(&key)
    }

    /// Takes every certificate in the store newer than the one in service here (see `SWEEP`).
    pub(super) async fn sweep(&self) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let Ok(all) = fleet.list_certs().await else {
            return;
        };
        let now = SystemTime::now();
        let mut in_store: HashMap<String, u64> = HashMap::new();
        for (name, stored) in all {
            let after = secs(stored.issued.not_after);
            in_store.insert(name.clone(), after);
            if after > self.serving_not_after(&name) && stored.issued.not_after > now {
                self.adopt(&name, &stored);
            }
        }
        // A store rebuilt empty (or behind) gets back what this replica serves, from its disk
        // (SCALEOUT §3.5): the newest `not_after` wins there.
        let serving: Vec<(String, u64)> = self.serving_lock().iter().map(|(n, a)| (n.clone(), *a)).collect();
        for (name, after) in serving {
            if in_store.get(&name).is_some_and(|&s| s >= after) {
                continue;
            }
            if let Some(Ok(ours)) = self.store.load_pem(&name).map(|(c, k)| Stored::new(c, k)) {
                if secs(ours.issued.not_after) == after {
                    self.share(&name, &ours).await;
                }
            }
        }
    }

    /// Two thirds into the lifetime, or inside the server's ARI window when it offers one.
    async fn renewal_time(&self, issued: &Issued) -> SystemTime {
        let fallback = schedule::renew_at(issued.not_before, issued.not_after);
        let Some(leaf) = issued.key.cert.first() else {
            return fallback;
        };
        let Ok(id) = instant_acme::CertificateIdentifier::try_from(leaf) else {
            return fallback;
        };
        let Ok(account) = self.account().await else {
            return fallback;
        };
        match account.renewal_info(&id).await {
            Ok((info, _retry_after)) => {
                let w = info.suggested_window;
                let start =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(w.start.unix_timestamp().max(0) as u64);
                let end = SystemTime::UNIX_EPOCH + Duration::from_secs(w.end.unix_timestamp().max(0) as u64);
                schedule::renew_in_window(start, end, rand::random::<f64>())
            }
            Err(_) => fallback,
        }
    }
}

/// Whether the store holds a certificate for `domain` expiring after `had`.
async fn newer_in_store(fleet: &Fleet, domain: &str, had: u64) -> bool {
    matches!(fleet.load_cert(domain).await, Ok(Some(s)) if secs(s.issued.not_after) > had)
}

/// Sleeps `wait`; returns true when a renewal was forced meanwhile.
async fn wait_or_forced(wait: Duration, renew_rx: &mut watch::Receiver<u64>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        changed = renew_rx.changed() => changed.is_ok(),
    }
}
