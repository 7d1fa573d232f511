//! The gateway's shared state, built once from a validated config and shared by every connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::acme::AcmeManager;
use crate::budget::Budget;
use crate::config::{Config, Limits, LiveLimits};
use crate::http::HttpContext;
use crate::ssh::channels::LocalDirectory;
use crate::ssh::hostkey::{self, HostKeyError};
use crate::ssh::keys::{AuthorizedKeys, KeysError};
use crate::ssh::{KeyPolicy, SshContext};
use crate::tls::certs::load_table;
use crate::tls::challenge::Challenges;
use crate::tls::local_ca::{self, LocalCa};
use crate::tls::resolver::{CertResolver, MayMint};
use crate::tls::{self, TlsError};
use crate::tunnels::{Directory, Registry, Route, TunnelKey, Tunnels};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    HostKey(#[from] HostKeyError),
    #[error("{0}")]
    Keys(#[from] KeysError),
    #[error("no certificate configured: add a [[tls.certificate]] (or run `edgemux dev`)")]
    NoCertificates,
    #[error("cannot make the stand-in certificate: {0}")]
    StandIn(String),
    #[error("admin.token_file {path}: {reason}")]
    AdminToken { path: String, reason: String },
}

/// The admin bearer token, trimmed; an empty or unreadable file is an error, not "no token".
fn read_admin_token(config: &Config) -> Result<Option<String>, BuildError> {
    let Some(admin) = &config.admin else {
        return Ok(None);
    };
    let Some(path) = &admin.token_file else {
        if !admin.bind.ip().is_loopback() {
            tracing::warn!(bind = %admin.bind, "admin listener is not on loopback and has no token_file: anyone who reaches it can read metrics and remove tunnels");
        }
        return Ok(None);
    };
    let err = |reason: String| BuildError::AdminToken {
        path: path.display().to_string(),
        reason,
    };
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(Some(token.to_owned()))
}

pub struct Gateway {
    config: Config,
    resolver: Arc<CertResolver>,
    tls: Arc<ServerConfig>,
    ssh: Arc<SshContext>,
    http: Arc<HttpContext>,
    tunnels: Arc<Tunnels>,
    metrics: Option<PrometheusHandle>,
    admin_token: Option<String>,
    ready: AtomicBool,
    challenges: Arc<Challenges>,
    acme: Option<Arc<AcmeManager>>,
    limits: LiveLimits,
    clients: ClientCounter,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("domain", &self.config.domain)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Loads certificates and keys; any failure here stops start-up with a clear message.
    pub fn build(config: Config, metrics: Option<PrometheusHandle>) -> Result<Arc<Self>, BuildError> {
        let mut table = load_table(&config.certificates)?;
        if table.is_empty() {
            if config.acme.is_none() {
                return Err(BuildError::NoCertificates);
            }
            // Until ACME has issued, handshakes complete with a self-signed stand-in, never hang.
            let stand_in = local_ca::self_signed(&config.domain).map_err(BuildError::StandIn)?;
            table.set_default(Arc::new(stand_in));
        }
        let tunnels = Registry::new();
        let local_ca = match &config.local_ca {
            Some(paths) => Some((LocalCa::load(paths)?, live_tunnel_hosts(&config.domain, &tunnels))),
            None => None,
        };
        let resolver = Arc::new(CertResolver::new(table, local_ca));
        let tls = tls::server_config(resolver.clone())?;
        let host_key = hostkey::load_or_generate(&config.ssh.host_key)?;
        let policy = match &config.ssh.authorized_keys {
            Some(path) => KeyPolicy::File(AuthorizedKeys::load(path)?),
            None => {
                tracing::warn!(
                    "no ssh.authorized_keys configured: any SSH key may open tunnels in its own namespace"
                );
                KeyPolicy::Open
            }
        };
        let limits: LiveLimits = Arc::new(ArcSwap::from_pointee(config.limits.clone()));
        let budget = Budget::new(limits.clone());
        let directory: Arc<dyn Directory> = Arc::new(LocalDirectory::new(
            tunnels.clone(),
            limits.clone(),
            config.ssh.channel_buffer,
            budget.clone(),
        ));
        let challenges = Arc::new(Challenges::default());
        let acme = config.acme.clone().map(|a| {
            AcmeManager::new(
                a,
                &config.certs_dir,
                challenges.clone(),
                resolver.clone(),
                tunnels.clone(),
            )
        });
        let mut ssh = SshContext::new(
            &config,
            (host_key, policy),
            tunnels.clone(),
            (directory.clone(), budget),
            limits.clone(),
        );
        if let Some(acme) = acme.clone() {
            ssh.on_http_tunnel = Some(Arc::new(move |host: &str| acme.request_on_demand(host)));
        }
        let ssh = Arc::new(ssh);
        let http = Arc::new(HttpContext::new(
            &config,
            directory,
            challenges.clone(),
            limits.clone(),
        ));
        let admin_token = read_admin_token(&config)?;
        Ok(Arc::new(Self {
            config,
            resolver,
            tls,
            ssh,
            http,
            tunnels,
            metrics,
            admin_token,
            ready: AtomicBool::new(false),
            challenges,
            acme,
            limits,
            clients: ClientCounter::default(),
        }))
    }

    /// SIGHUP: re-read certificates and authorized keys, and apply `new`'s limits. A broken file
    /// keeps the old state in force. Settings that need a restart are named in the log.
    pub fn reload(&self, new: Option<&Config>) {
        if let Some(new) = new {
            self.limits.store(Arc::new(new.limits.clone()));
            tracing::info!("limits reloaded");
            warn_restart_needed(&self.config, new);
        }
        let certificates = new.map_or(&self.config.certificates, |c| &c.certificates);
        match load_table(certificates) {
            Ok(table) if !table.is_empty() => {
                self.resolver.swap(table);
                tracing::info!("certificates reloaded");
            }
            Ok(_) => tracing::warn!("certificates not reloaded: none configured"),
            Err(e) => {
                tracing::warn!(error = %e, "certificates not reloaded; the previous ones stay in service")
            }
        }
        self.ssh.policy.reload();
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A snapshot of the limits in force (they change on reload).
    pub(crate) fn limits(&self) -> Arc<Limits> {
        self.limits.load_full()
    }

    pub(crate) fn clients(&self) -> &ClientCounter {
        &self.clients
    }

    pub(crate) fn tls_config(&self) -> Arc<ServerConfig> {
        self.tls.clone()
    }

    pub(crate) fn ssh(&self) -> Arc<SshContext> {
        self.ssh.clone()
    }

    pub(crate) fn http(&self) -> Arc<HttpContext> {
        self.http.clone()
    }

    pub(crate) fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    pub(crate) fn metrics(&self) -> Option<&PrometheusHandle> {
        self.metrics.as_ref()
    }

    pub(crate) fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// Listeners are serving and certificates are loaded.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn challenges(&self) -> &Challenges {
        &self.challenges
    }

    pub(crate) fn acme(&self) -> Option<&Arc<AcmeManager>> {
        self.acme.as_ref()
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

/// What the local CA may mint for: a host under `domain` that serves an HTTP tunnel right now
/// (random names must not make it mint without end).
fn live_tunnel_hosts(domain: &str, tunnels: &Arc<Tunnels>) -> MayMint {
    let (domain, tunnels) = (domain.to_owned(), tunnels.clone());
    Box::new(move |sni: &str| {
        let under_domain =
            sni.len() > domain.len() && sni.to_ascii_lowercase().ends_with(&format!(".{domain}"));
        let host = crate::names::canonical_host(sni, &domain).filter(|_| under_domain)?;
        let key = TunnelKey {
            host,
            route: Route::Http,
        };
        tunnels.contains(&key).then_some(key.host)
    })
}

fn warn_restart_needed(old: &Config, new: &Config) {
    let changed = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let l = (&old.limits, &new.limits);
    let checks: [(&str, bool); 10] = [
        ("domain", old.domain != new.domain),
        ("public_port", old.public_port != new.public_port),
        ("listener", changed(&old.listeners, &new.listeners)),
        ("tls.certs_dir", old.certs_dir != new.certs_dir),
        ("tls.local_ca", changed(&old.local_ca, &new.local_ca)),
        ("admin", changed(&old.admin, &new.admin)),
        ("acme", changed(&old.acme, &new.acme)),
        ("ssh", changed(&old.ssh, &new.ssh)),
        (
            "limits.max_connections",
            l.0.max_connections != l.1.max_connections,
        ),
        (
            "limits.ssh_auth_attempts",
            l.0.ssh_auth_attempts != l.1.ssh_auth_attempts,
        ),
    ];
    for (key, differs) in checks {
        if differs {
            tracing::warn!(key, "this setting changed but takes effect only after a restart");
        }
    }
}

/// Open connections per client address, for `limits.max_connections_per_client`.
#[derive(Debug, Default)]
pub struct ClientCounter(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place in the per-client count; dropping it frees the place.
#[derive(Debug)]
pub struct ClientSlot<'a> {
    counter: &'a ClientCounter,
    ip: std::net::IpAddr,
}

impl ClientCounter {
    /// Takes a place for `ip`, or `None` when it already has `limit` connections.
    pub fn acquire(&self, ip: std::net::IpAddr, limit: usize) -> Option<ClientSlot<'_>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot { counter: self, ip })
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.counter.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
