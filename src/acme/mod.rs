//! Automatic certificates with ACME (Let's Encrypt): TLS-ALPN-01 answered on the main listener,
//! or HTTP-01 on plain HTTP; stored certificates served at once; renewal at two thirds of the
//! lifetime (or inside the server's ARI window) with backoff; on-demand certificates for tunnel
//! hosts within their share of the budget (the rest stays for the configured domains). A failed
//! renewal never removes a certificate in service.
//!
//! `manage` keeps one name valid, `order` places one order, `store` is the on-disk state. With
//! `[cluster]`, the replicas share their ACME state in the cluster store (`fleet` over the
//! `shared::SharedStore` seam, keys sealed by `seal`): one replica orders a name under its lock,
//! the others take the result; the disk stays a write-through cache, so TLS never waits on the
//! store.

mod fleet;
mod manage;
mod order;
pub(crate) mod schedule;
mod seal;
pub(crate) mod shared;
mod store;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use instant_acme::{Account, AccountCredentials, NewAccount};
use tokio::sync::{mpsc, watch, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::config::AcmeConfig;
use crate::tls::certs::{unix_secs, Issued};
use crate::tls::challenge::Challenges;
use crate::tls::resolver::CertResolver;
use crate::tunnels::Tunnels;
use fleet::Fleet;
use schedule::Budget;
use shared::SharedStore;
use store::Store;

/// How often a cluster replica takes every certificate the store holds that it does not serve
/// yet: names other replicas order (on-demand hosts of their tunnels, a forced renewal there).
/// A replica due to renew a name reads the store first anyway; this only bounds how stale the
/// rest may be. One list of the `acme/certs/` prefix per replica per period.
const SWEEP: Duration = Duration::from_secs(30);

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

/// What a cluster hands the ACME client: its store, through the seam, and the key that seals
/// private keys in it.
pub(crate) struct SharedAcme {
    pub(crate) store: Arc<dyn SharedStore>,
    pub(crate) seal_key: [u8; 32],
}

pub(crate) struct AcmeManager {
    cfg: AcmeConfig,
    store: Store,
    /// With `[cluster]`: the state shared with the other replicas.
    fleet: Option<Fleet>,
    challenges: Arc<Challenges>,
    resolver: Arc<CertResolver>,
    tunnels: Arc<Tunnels>,
    account: OnceCell<Account>,
    budget: Mutex<Budget>,
    managed: Mutex<HashSet<String>>,
    /// The notAfter (Unix seconds) of what is in service, by name: a certificate from the store
    /// replaces it only when newer.
    serving: Mutex<HashMap<String, u64>>,
    renew_now: watch::Sender<u64>,
    on_demand_tx: mpsc::UnboundedSender<String>,
    on_demand_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("directory", &self.cfg.directory)
            .field("shared", &self.fleet.is_some())
            .finish_non_exhaustive()
    }
}

impl AcmeManager {
    /// Loads the stored certificates into `resolver` at once, so a restart serves them before
    /// any network round trip and places no order for them. `shared`: with `[cluster]`.
    pub(crate) fn new(
        cfg: AcmeConfig,
        certs_dir: &std::path::Path,
        (challenges, resolver): (Arc<Challenges>, Arc<CertResolver>),
        tunnels: Arc<Tunnels>,
        shared: Option<SharedAcme>,
    ) -> Arc<Self> {
        crate::metrics::zero_acme_orders();
        let store = Store::new(certs_dir);
        let fleet = shared.and_then(|s| {
            challenges.set_fetch(Fleet::fetcher(s.store.clone()));
            Fleet::new(s.store, &s.seal_key, cfg.limits)
        });
        let (renew_now, _) = watch::channel(0);
        let (on_demand_tx, on_demand_rx) = mpsc::unbounded_channel();
        let me = Arc::new(Self {
            budget: Mutex::new(Budget::new(cfg.limits)),
            cfg,
            store,
            fleet,
            challenges,
            resolver,
            tunnels,
            account: OnceCell::new(),
            managed: Mutex::new(HashSet::new()),
            serving: Mutex::new(HashMap::new()),
            renew_now,
            on_demand_tx,
            on_demand_rx: Mutex::new(Some(on_demand_rx)),
        });
        let now = SystemTime::now();
        for domain in &me.cfg.domains {
            if let Some(issued) = me.store.load_cert(domain, now) {
                tracing::info!(domain, "serving the stored ACME certificate");
                me.install(domain, &issued);
            }
        }
        me
    }

    /// Starts a manager task per configured domain and the on-demand listener; in a cluster,
    /// the sweep that takes other replicas' certificates.
    pub(crate) fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        for domain in self.cfg.domains.clone() {
            self.spawn_manage(domain, false, shutdown.clone());
        }
        let rx = self.on_demand_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let (Some(mut rx), true) = (rx, self.cfg.on_demand) {
            let me = self.clone();
            let shutdown = shutdown.clone();
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
        if self.fleet.is_some() {
            let me = self.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(SWEEP);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = ticks.tick() => me.sweep().await,
                    }
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

    /// Puts a certificate in service for new handshakes; established connections keep theirs.
    fn install(&self, domain: &str, issued: &Issued) {
        self.resolver.insert_dynamic(domain, issued.key.clone());
        let not_after = fleet::secs(issued.not_after);
        self.serving_lock().insert(domain.to_owned(), not_after);
        crate::metrics::cert_expiry(domain, unix_secs(issued.not_after));
    }

    /// The notAfter of the certificate in service for `domain` (0: none).
    fn serving_not_after(&self, domain: &str) -> u64 {
        self.serving_lock().get(domain).copied().unwrap_or(0)
    }

    fn serving_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn account(&self) -> Result<&Account, AcmeError> {
        self.account
            .get_or_try_init(|| self.load_or_create_account())
            .await
    }

    /// The cluster's account if the store has one, else this replica's file, else a new one;
    /// the one used is kept in both.
    async fn load_or_create_account(&self) -> Result<Account, AcmeError> {
        let dir = &self.cfg.directory;
        let builder = || match &self.cfg.root_ca {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let id = store::directory_id(dir);
        let shared = match &self.fleet {
            Some(fleet) => fleet.load_account(&id).await.unwrap_or_else(|e| {
                tracing::info!(error = %e, "cluster store unavailable: using this replica's ACME account");
                None
            }),
            None => None,
        };
        let local = self.store.load_account(dir);
        if let Some(json) = shared.as_ref().or(local.as_ref()) {
            let creds: AccountCredentials =
                serde_json::from_str(json).map_err(|e| AcmeError::Account(e.to_string()))?;
            if shared.is_some() && local.as_deref() != Some(json) {
                self.store.save_account(dir, json)?;
            }
            if let (Some(fleet), None) = (&self.fleet, &shared) {
                let _ = fleet.save_account(&id, json).await;
            }
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
        if let Some(fleet) = &self.fleet {
            let _ = fleet.save_account(&id, &json).await;
        }
        tracing::info!(directory = dir, "created an ACME account");
        Ok(account)
    }
}
