//! Automatic certificates with ACME (Let's Encrypt): TLS-ALPN-01 answered on the main listener,
//! or HTTP-01 on plain HTTP; stored certificates served at once; renewal at two thirds of the
//! lifetime (or inside the server's ARI window) with backoff; on-demand certificates for tunnel
//! hosts within their share of the budget (the rest stays for the configured domains). A failed
//! renewal never removes a certificate in service.

pub(crate) mod schedule;
mod store;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use tokio::sync::{mpsc, watch, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::config::{AcmeConfig, ChallengeKind};
use crate::tls::certs::{parse_pem, unix_secs, Issued};
use crate::tls::challenge::Challenges;
use crate::tls::resolver::CertResolver;
use crate::tunnels::{Route, TunnelKey, Tunnels};
use schedule::Budget;
use store::Store;

/// How long one order may take end to end before it counts as failed.
const ORDER_TIMEOUT: Duration = Duration::from_secs(180);
/// Polling while the server validates and issues.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .timeout(Duration::from_secs(90));

#[derive(Debug, thiserror::Error)]
pub(crate) enum AcmeError {
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("ACME account file: {0}")]
    Account(String),
    #[error("ACME order for {domain} ended {status}")]
    Order { domain: String, status: String },
    #[error("ACME challenge {0} not offered by the server")]
    NoChallenge(&'static str),
    #[error("cannot prepare the challenge: {0}")]
    Challenge(String),
    #[error("cannot store the certificate: {0}")]
    Store(#[from] std::io::Error),
    #[error("the issued certificate does not load: {0}")]
    Issued(String),
    #[error("the order took longer than {0:?}")]
    Timeout(Duration),
}

pub(crate) struct AcmeManager {
    cfg: AcmeConfig,
    store: Store,
    challenges: Arc<Challenges>,
    resolver: Arc<CertResolver>,
    tunnels: Arc<Tunnels>,
    account: OnceCell<Account>,
    budget: Mutex<Budget>,
    managed: Mutex<HashSet<String>>,
    renew_now: watch::Sender<u64>,
    on_demand_tx: mpsc::UnboundedSender<String>,
    on_demand_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("directory", &self.cfg.directory)
            .finish_non_exhaustive()
    }
}

impl AcmeManager {
    /// Loads the stored certificates into `resolver` at once, so a restart serves them before
    /// any network round trip and places no order for them.
    pub(crate) fn new(
        cfg: AcmeConfig,
        certs_dir: &std::path::Path,
        challenges: Arc<Challenges>,
        resolver: Arc<CertResolver>,
        tunnels: Arc<Tunnels>,
    ) -> Arc<Self> {
        let store = Store::new(certs_dir);
        let now = SystemTime::now();
        for domain in &cfg.domains {
            if let Some(issued) = store.load_cert(domain, now) {
                tracing::info!(domain, "serving the stored ACME certificate");
                install(&resolver, domain, &issued);
            }
        }
        let (renew_now, _) = watch::channel(0);
        let (on_demand_tx, on_demand_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            budget: Mutex::new(Budget::new(cfg.limits)),
            cfg,
            store,
            challenges,
            resolver,
            tunnels,
            account: OnceCell::new(),
            managed: Mutex::new(HashSet::new()),
            renew_now,
            on_demand_tx,
            on_demand_rx: Mutex::new(Some(on_demand_rx)),
        })
    }

    /// Starts a manager task per configured domain and the on-demand listener.
    pub(crate) fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        for domain in self.cfg.domains.clone() {
            self.spawn_manage(domain, false, shutdown.clone());
        }
        let rx = self.on_demand_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let (Some(mut rx), true) = (rx, self.cfg.on_demand) {
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(host) = rx.recv().await {
                    if me.resolver.covers(&host) {
                        continue;
                    }
                    tracing::info!(host, "no certificate covers this tunnel host: ordering one");
                    me.spawn_manage(host, true, shutdown.clone());
                }
            });
        }
    }

    /// A tunnel registered `host`; an on-demand certificate is ordered if nothing covers it.
    pub(crate) fn request_on_demand(&self, host: &str) {
        if self.cfg.on_demand {
            let _ = self.on_demand_tx.send(host.to_owned());
        }
    }

    /// Renews every managed certificate now (admin API).
    pub(crate) fn renew_all(&self) {
        self.renew_now.send_modify(|n| *n += 1);
    }

    fn spawn_manage(self: &Arc<Self>, domain: String, on_demand: bool, shutdown: CancellationToken) {
        if !self
            .managed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(domain.clone())
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = me.manage(&domain, on_demand) => {}
                () = shutdown.cancelled() => {}
            }
            me.managed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&domain);
        });
    }

    /// Keeps one domain's certificate valid for as long as it is managed.
    async fn manage(&self, domain: &str, on_demand: bool) {
        let mut renew_rx = self.renew_now.subscribe();
        renew_rx.borrow_and_update();
        let mut failures = 0u32;
        let mut forced = false;
        loop {
            let now = SystemTime::now();
            let current = self.store.load_cert(domain, now);
            if let Some(issued) = &current {
                install(&self.resolver, domain, issued);
            }
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
                return;
            }
            if let Err(refusal) = self.take_budget(domain, on_demand) {
                tracing::warn!(domain, ?refusal, "ACME order budget exhausted; waiting");
                crate::metrics::acme_order("budget");
                forced = wait_or_forced(Duration::from_secs(3600), &mut renew_rx).await;
                continue;
            }
            match tokio::time::timeout(ORDER_TIMEOUT, self.order(domain)).await {
                Ok(Ok(issued)) => {
                    failures = 0;
                    crate::metrics::acme_order("ok");
                    install(&self.resolver, domain, &issued);
                    tracing::info!(domain, "certificate issued and in service");
                }
                res => {
                    failures += 1;
                    let err = res.unwrap_or(Err(AcmeError::Timeout(ORDER_TIMEOUT)));
                    crate::metrics::acme_order("failed");
                    self.budget_lock().record_failure(domain, SystemTime::now());
                    let delay = schedule::backoff(failures, rand::random::<f64>());
                    let error = err.err().map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(
                        domain,
                        failures,
                        retry_in_secs = delay.as_secs(),
                        error,
                        "ACME order failed; the current certificate stays in service"
                    );
                    forced = wait_or_forced(delay, &mut renew_rx).await;
                }
            }
        }
    }

    fn budget_lock(&self) -> std::sync::MutexGuard<'_, Budget> {
        self.budget.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_budget(&self, domain: &str, on_demand: bool) -> Result<(), schedule::Refusal> {
        self.budget_lock().try_order(domain, on_demand, SystemTime::now())
    }

    fn tunnel_exists(&self, host: &str) -> bool {
        let key = TunnelKey {
            host: host.to_owned(),
            route: Route::Http,
        };
        self.tunnels.contains(&key)
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

    async fn account(&self) -> Result<&Account, AcmeError> {
        self.account
            .get_or_try_init(|| self.load_or_create_account())
            .await
    }

    async fn load_or_create_account(&self) -> Result<Account, AcmeError> {
        let dir = &self.cfg.directory;
        let builder = || match &self.cfg.root_ca {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        if let Some(json) = self.store.load_account(dir) {
            let creds: AccountCredentials =
                serde_json::from_str(&json).map_err(|e| AcmeError::Account(e.to_string()))?;
            tracing::info!(directory = dir, "using the stored ACME account");
            return Ok(builder()?.from_credentials(creds).await?);
        }
        let contact: Vec<&str> = self.cfg.contact.iter().map(String::as_str).collect();
        let new = NewAccount {
            contact: &contact,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, creds) = builder()?.create(&new, dir.clone(), None).await?;
        let json = serde_json::to_string(&creds).map_err(|e| AcmeError::Account(e.to_string()))?;
        self.store.save_account(dir, &json)?;
        tracing::info!(directory = dir, "created an ACME account");
        Ok(account)
    }

    /// One order: authorizations answered with our challenge type, finalized, stored, returned.
    async fn order(&self, domain: &str) -> Result<Issued, AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(domain.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        tracing::info!(domain, url = order.url(), "ACME order placed");
        let kind = match self.cfg.challenge {
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Http01 => ChallengeType::Http01,
        };
        // Withdrawn when the order ends however it ends: error, timeout (the future is dropped)
        // or shutdown.
        let mut published = Published {
            challenges: &self.challenges,
            entries: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let ident = authz.identifier().to_string();
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or(AcmeError::NoChallenge(self.cfg.challenge.name()))?;
            let key_auth = challenge.key_authorization();
            match self.cfg.challenge {
                ChallengeKind::TlsAlpn01 => self
                    .challenges
                    .add_tls_alpn(&ident, key_auth.digest().as_ref())
                    .map_err(AcmeError::Challenge)?,
                ChallengeKind::Http01 => self.challenges.add_http01(&challenge.token, key_auth.as_str()),
            }
            published.entries.push((ident.clone(), challenge.token.clone()));
            challenge.set_ready().await?;
            tracing::info!(
                domain,
                identifier = ident,
                challenge = self.cfg.challenge.name(),
                "challenge ready"
            );
        }
        self.finish(&mut order, domain).await
    }

    async fn finish(&self, order: &mut instant_acme::Order, domain: &str) -> Result<Issued, AcmeError> {
        let status = order.poll_ready(&POLL).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order {
                domain: domain.to_owned(),
                status: format!("{status:?}"),
            });
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&POLL).await?;
        let issued = parse_pem(chain_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| AcmeError::Issued(e.to_string()))?;
        self.store.save_cert(domain, &chain_pem, &key_pem)?;
        Ok(issued)
    }
}

/// Challenge answers published for one order; dropping it withdraws them.
struct Published<'a> {
    challenges: &'a Challenges,
    entries: Vec<(String, String)>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for (ident, token) in &self.entries {
            self.challenges.remove(ident, token);
        }
    }
}

/// Puts a certificate in service for new handshakes; established connections keep theirs.
fn install(resolver: &CertResolver, domain: &str, issued: &Issued) {
    resolver.insert_dynamic(domain, issued.key.clone());
    crate::metrics::cert_expiry(domain, unix_secs(issued.not_after));
}

/// Sleeps `wait`; returns true when a renewal was forced meanwhile.
async fn wait_or_forced(wait: Duration, renew_rx: &mut watch::Receiver<u64>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        changed = renew_rx.changed() => changed.is_ok(),
    }
}
