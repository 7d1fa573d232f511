//! The gateway's shared state, built once from a validated config and shared by every connection.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::acme::AcmeManager;
use crate::budget::Budget;
use crate::config::{Config, Limits, LiveLimits};
use crate::http::HttpContext;
use crate::io::ClientKey;
use crate::ssh::channels::LocalDirectory;
use crate::ssh::hostkey::{self, HostKeyError};
use crate::ssh::keys::{AuthorizedKeys, KeysError};
use crate::ssh::{KeyPolicy, SshContext};
use crate::tls::certs::load_table;
use crate::tls::challenge::Challenges;
use crate::tls::local_ca::{self, LocalCa};
use crate::tls::resolver::{CertResolver, MayMint};
use crate::tls::{self, TlsError};
use crate::tunnels::{Directory, KeyOwners, Registry, Route, TunnelKey, Tunnels};

/// Under `certs_dir`: which full key owns each short key id (see `tunnels::KeyOwners`).
const KEY_OWNERS_FILE: &str = "key-owners";
/// How often a replica re-checks the authorized keys it publishes in its config hash: the file
/// is re-read at logins too, without a SIGHUP, and the hash must follow the keys in force.
#[cfg(feature = "store")]
const CONFIG_HASH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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
    #[error(
        "[cluster] needs a store backend, and this build has none (build with the `etcd` or `redis` cargo feature)"
    )]
    ClusterNotServed,
    #[cfg(feature = "store")]
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("cannot read the gateway state {path}: {reason}")]
    State { path: String, reason: String },
    #[error("admin.token_file {path}: {reason}")]
    AdminToken { path: String, reason: String },
}

/// The admin bearer token, trimmed; an empty or unreadable file is an error, not "no token".
/// (Without a token the admin listener is on loopback: `config` refuses any other bind.)
fn read_admin_token(config: &Config) -> Result<Option<String>, BuildError> {
    let Some(path) = config.admin.as_ref().and_then(|a| a.token_file.as_ref()) else {
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

/// The key that signs the links to private tunnels, kept in `<certs_dir>/links.key` so links
/// survive restarts (and are all revoked by deleting the file).
fn read_link_key(config: &Config) -> Result<crate::rules::token::LinkKey, BuildError> {
    let path = config.certs_dir.join(LINK_KEY_FILE);
    let secret = crate::secret_file::read_or_create_token(&path).map_err(|e| BuildError::State {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(crate::rules::token::LinkKey::new(secret.as_bytes()))
}

const LINK_KEY_FILE: &str = "links.key";

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
    /// Where tunnels are: this gateway's, and with `[cluster]` other replicas' too.
    directory: Arc<dyn Directory>,
    cluster: Option<ClusterPart>,
}

#[cfg(feature = "store")]
type ClusterPart = crate::cluster::Cluster;
/// Without a store backend a gateway never has a cluster part.
#[cfg(not(feature = "store"))]
type ClusterPart = std::convert::Infallible;

/// With `[cluster]`: starts this replica's part in the cluster and wraps `local` in the cluster
/// directory. Without it: nothing starts, `local` is the directory.
#[cfg(feature = "store")]
fn start_cluster(
    config: &Config,
    (tunnels, policy): (&Arc<Tunnels>, &KeyPolicy),
    local: Arc<dyn Directory>,
) -> Result<(Option<ClusterPart>, Arc<dyn Directory>), BuildError> {
    let Some(cfg) = &config.cluster else {
        return Ok((None, local));
    };
    let (cluster, directory) = crate::cluster::Cluster::start(
        cfg,
        (tunnels, local),
        config.ssh.reserved.clone(),
        (config.limits.tunnel_open_timeout, config.public_port),
        (config_hash(config, &config.limits, policy), &config.certs_dir),
    )?;
    Ok((Some(cluster), directory))
}

/// With `[cluster]`, the ACME state is the cluster's (SCALEOUT §7).
#[cfg(feature = "store")]
fn shared_acme(cluster: Option<&ClusterPart>) -> Option<crate::acme::SharedAcme> {
    cluster.map(crate::cluster::Cluster::shared_acme)
}

#[cfg(not(feature = "store"))]
fn shared_acme(_: Option<&ClusterPart>) -> Option<crate::acme::SharedAcme> {
    None
}

/// The hash every replica publishes and compares (`cluster::drift`): `config`'s settings (those
/// that change only at a restart), the `limits` in force, and the keys `policy` allows now.
#[cfg(feature = "store")]
fn config_hash(config: &Config, limits: &Limits, policy: &KeyPolicy) -> String {
    crate::cluster::drift::config_hash(config, limits, policy.keys().as_deref())
}

#[cfg(not(feature = "store"))]
fn start_cluster(
    config: &Config,
    _: (&Arc<Tunnels>, &KeyPolicy),
    local: Arc<dyn Directory>,
) -> Result<(Option<ClusterPart>, Arc<dyn Directory>), BuildError> {
    match config.cluster {
        Some(_) => Err(BuildError::ClusterNotServed),
        None => Ok((None, local)),
    }
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
        let host_key_fingerprint = hostkey::fingerprint(&host_key);
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
        let (cluster, directory) = start_cluster(&config, (&tunnels, &policy), directory)?;
        let challenges = Arc::new(Challenges::default());
        let acme = config.acme.clone().map(|a| {
            AcmeManager::new(
                a,
                &config.certs_dir,
                (challenges.clone(), resolver.clone()),
                tunnels.clone(),
                shared_acme(cluster.as_ref()),
            )
        });
        let owners_file = config.certs_dir.join(KEY_OWNERS_FILE);
        let owners = KeyOwners::load(&owners_file).map_err(|e| BuildError::State {
            path: owners_file.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut ssh = SshContext::new(
            &config,
            (host_key, policy),
            (tunnels.clone(), Arc::new(owners)),
            (directory.clone(), budget),
            limits.clone(),
        );
        if let Some(acme) = acme.clone() {
            ssh.on_http_tunnel = Some(Arc::new(move |host: &str| acme.request_on_demand(host)));
        }
        let links = Arc::new(read_link_key(&config)?);
        ssh.links = links.clone();
        let ssh = Arc::new(ssh);
        let mut http = HttpContext::new(&config, directory.clone(), challenges.clone(), limits.clone());
        http.links = links;
        http.host_key_fingerprint = host_key_fingerprint;
        let http = Arc::new(http);
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
            directory,
            cluster,
        }))
    }

    /// SIGHUP: re-read certificates and authorized keys, and apply `new`'s limits. A broken file
    /// keeps the old state in force. Settings that need a restart are named in the log. With
    /// `[cluster]`, the config hash of what is now in force is published (bounded by
    /// `cluster.store_timeout`).
    pub async fn reload(&self, new: Option<&Config>) {
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
        #[cfg(feature = "store")]
        if let Some(cluster) = &self.cluster {
            let hash = config_hash(&self.config, &self.limits.load(), &self.ssh.policy);
            cluster.set_config_hash(hash).await;
        }
    }

    /// With `[cluster]`, until `stop`: publishes a new config hash whenever the authorized keys
    /// in force change without a reload (an edited file is re-read at the next login, or here).
    #[cfg(feature = "store")]
    pub(crate) async fn follow_config_hash(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let mut ticks = tokio::time::interval(CONFIG_HASH_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.ssh.policy.refresh();
            let hash = config_hash(&self.config, &self.limits.load(), &self.ssh.policy);
            if hash != cluster.config_hash() {
                cluster.set_config_hash(hash).await;
            }
        }
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

    /// Listeners are serving and certificates are loaded, and this replica has not fenced
    /// itself (`cluster::fence`; kept apart from draining, which only ends with the process).
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.fenced()
    }

    #[cfg(feature = "store")]
    fn fenced(&self) -> bool {
        self.cluster.as_ref().is_some_and(crate::cluster::Cluster::fenced)
    }

    #[cfg(not(feature = "store"))]
    fn fenced(&self) -> bool {
        false
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

    /// Draining: `/readyz` answers 503 so the load balancer sends new flows elsewhere.
    pub(crate) fn set_draining(&self) {
        self.ready.store(false, Ordering::Release);
    }

    pub(crate) fn directory(&self) -> &Arc<dyn Directory> {
        &self.directory
    }

    /// This replica's part in the cluster, with `[cluster]`.
    #[cfg(feature = "store")]
    pub(crate) fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        self.cluster.as_ref()
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
    let checks: [(&str, bool); 12] = [
        ("domain", old.domain != new.domain),
        ("public_port", old.public_port != new.public_port),
        ("listener", changed(&old.listeners, &new.listeners)),
        ("tls.certs_dir", old.certs_dir != new.certs_dir),
        ("tls.local_ca", changed(&old.local_ca, &new.local_ca)),
        ("http", changed(&old.http, &new.http)),
        ("admin", changed(&old.admin, &new.admin)),
        ("acme", changed(&old.acme, &new.acme)),
        ("cluster", changed(&old.cluster, &new.cluster)),
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

/// Open connections per client, for `limits.max_connections_per_client`. An IPv4 client is its
/// address; an IPv6 client is its /64: one host may use any of its subnet's 2^64 addresses
/// (temporary addresses, RFC 8981), so counted by address it would have no limit.
#[derive(Debug, Default)]
pub struct ClientCounter(std::sync::Mutex<std::collections::HashMap<ClientKey, usize>>);

/// One connection's place in the per-client count; dropping it frees the place.
#[derive(Debug)]
pub struct ClientSlot<'a> {
    counter: &'a ClientCounter,
    client: ClientKey,
}

impl ClientCounter {
    /// Takes a place for `ip`'s client, or `None` when it already has `limit` connections.
    pub fn acquire(&self, ip: IpAddr, limit: usize) -> Option<ClientSlot<'_>> {
        let client = ClientKey::of(ip);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(client).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counter: self,
            client,
        })
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.counter.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let counter = ClientCounter::default();
        let a = counter.acquire(ip("2001:db8:1:2::1"), 2).unwrap();
        let _b = counter
            .acquire(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 2)
            .unwrap();
        assert!(
            counter.acquire(ip("2001:db8:1:2:dead::beef"), 2).is_none(),
            "a third address of the same /64 is over the limit"
        );
        assert!(
            counter.acquire(ip("2001:db8:1:3::1"), 2).is_some(),
            "the next /64 is another client"
        );
        drop(a);
        assert!(
            counter.acquire(ip("2001:db8:1:2::77"), 2).is_some(),
            "a freed place is taken"
        );
    }

    #[test]
    fn ipv4_clients_are_counted_by_address_mapped_or_not() {
        let counter = ClientCounter::default();
        let _a = counter.acquire(ip("192.0.2.1"), 1).unwrap();
        assert!(
            counter.acquire(ip("::ffff:192.0.2.1"), 1).is_none(),
            "mapped is the same client"
        );
        assert!(
            counter.acquire(ip("192.0.2.2"), 1).is_some(),
            "a neighbour is another client"
        );
    }

    #[test]
    fn a_client_without_connections_is_forgotten() {
        let counter = ClientCounter::default();
        let slots: Vec<_> = (1..=3)
            .map(|i| counter.acquire(ip(&format!("2001:db8:{i}::1")), 1).unwrap())
            .collect();
        assert_eq!(counter.0.lock().unwrap().len(), 3);
        drop(slots);
        assert!(counter.0.lock().unwrap().is_empty());
    }
}
