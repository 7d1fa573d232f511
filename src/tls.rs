//! TLS termination: certificates chosen by SNI (exact, then wildcard, then the default), TLS 1.2+
//! only, ALPN `h2`, `http/1.1`, `ssh`. The ClientHello is read first (`LazyConfigAcceptor`) so the
//! SNI and ALPN are known before the handshake finishes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::acme::challenge::{Challenges, ACME_TLS_ALPN};
use crate::certs::LocalCa;
use crate::config::CertificatePaths;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_SSH: &[u8] = b"ssh";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("{path} holds no DNS names (subjectAltName)")]
    NoNames { path: String },
    #[error("TLS set-up failed: {0}")]
    Setup(#[from] rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("acme-tls/1 offered but no ACME challenge is pending")]
    NoChallenge,
}

impl TlsError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Certificate { .. } | Self::NoNames { .. } | Self::Setup(_) => "setup",
            Self::Handshake(_) => "handshake",
            Self::NoChallenge => "no_acme_challenge",
        }
    }
}

/// The certificates in service, by name. Swapped whole, so a reload is atomic for new handshakes
/// and leaves established connections alone.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain: `*.gw.test` is stored under `gw.test`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    /// Adds a certificate under each of its names; the first certificate added is the default.
    pub fn insert(&mut self, names: &[String], key: Arc<CertifiedKey>) {
        for name in names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.to_owned()),
                None => self.exact.entry(name),
            }
            .or_insert_with(|| key.clone());
        }
        self.default.get_or_insert(key);
    }

    /// Serves `key` to clients whose SNI no certificate names, without naming anything itself.
    pub fn set_default(&mut self, key: Arc<CertifiedKey>) {
        self.default = Some(key);
    }

    /// The most specific certificate for `sni`: exact, then a wildcard one label up, then the default.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        sni.and_then(|s| self.lookup_named(s))
            .or_else(|| self.default.clone())
    }

    /// A certificate that names `sni` (exactly or by wildcard), without falling back to the default.
    pub fn lookup_named(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.lookup_exact(sni).or_else(|| self.lookup_wildcard(sni))
    }

    pub fn lookup_exact(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.exact.get(&sni.to_ascii_lowercase()).cloned()
    }

    /// A wildcard certificate one label up (`*.gw.test` for `a.gw.test`).
    pub fn lookup_wildcard(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let sni = sni.to_ascii_lowercase();
        let (_, parent) = sni.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.default.is_none()
    }
}

/// A local CA, the domain it mints under, and the registry that says which hosts are live.
pub type LocalCaFor = (LocalCa, String, std::sync::Arc<crate::tunnels::Tunnels>);

/// rustls' certificate hook over a hot-swappable [`CertTable`], with an optional local CA that
/// mints certificates for tunnel hosts under the domain.
#[derive(Debug, Default)]
pub struct CertResolver {
    table: RwLock<Arc<CertTable>>,
    /// Certificates obtained at run time (ACME), by exact name.
    dynamic: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    local_ca: Option<LocalCaFor>,
}

impl CertResolver {
    pub fn new(table: CertTable, local_ca: Option<LocalCaFor>) -> Self {
        Self {
            table: RwLock::new(Arc::new(table)),
            dynamic: RwLock::new(HashMap::new()),
            local_ca,
        }
    }

    /// Serves `key` for `name` from the next handshake on.
    pub fn insert_dynamic(&self, name: &str, key: Arc<CertifiedKey>) {
        let mut d = self.dynamic.write().unwrap_or_else(|p| p.into_inner());
        d.insert(name.to_ascii_lowercase(), key);
    }

    fn dynamic_exact(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.dynamic.read().ok()?.get(&name.to_ascii_lowercase()).cloned()
    }

    fn dynamic_any(&self) -> Option<Arc<CertifiedKey>> {
        self.dynamic.read().ok()?.values().next().cloned()
    }

    /// Whether a static or issued certificate names `host` (exactly or by wildcard).
    pub fn covers(&self, host: &str) -> bool {
        self.current().lookup_named(host).is_some() || self.dynamic_exact(host).is_some()
    }

    /// The most specific certificate: exact (static, then issued), wildcard, minted by the local
    /// CA, then the default (or any issued one when nothing else exists).
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let table = self.current();
        let named = sni.and_then(|s| {
            table
                .lookup_exact(s)
                .or_else(|| self.dynamic_exact(s))
                .or_else(|| table.lookup_wildcard(s))
                .or_else(|| self.mint(s))
        });
        named
            .or_else(|| table.lookup(None))
            .or_else(|| self.dynamic_any())
    }

    fn mint(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let (ca, domain, tunnels) = self.local_ca.as_ref()?;
        let under_domain =
            sni.len() > domain.len() && sni.to_ascii_lowercase().ends_with(&format!(".{domain}"));
        let host = crate::ssh::names::canonical_host(sni, domain).filter(|_| under_domain)?;
        // Only for hosts that serve a tunnel: random names must not make us mint without end.
        let key = crate::tunnels::TunnelKey {
            host,
            route: crate::tunnels::Route::Http,
        };
        if !tunnels.contains(&key) {
            return None;
        }
        ca.certificate_for(&key.host)
    }

    pub fn swap(&self, table: CertTable) {
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
    }

    fn current(&self) -> Arc<CertTable> {
        self.table
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// Loads a PEM chain and key into a `CertifiedKey`, returning it with the names it covers.
pub fn load_certificate(paths: &CertificatePaths) -> Result<(Vec<String>, CertifiedKey), TlsError> {
    let cert_err = |path: &Path, reason: String| TlsError::Certificate {
        path: path.display().to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .and_then(|it| it.collect())
        .map_err(|e| cert_err(&paths.cert, e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err(&paths.cert, "no certificate in file".into()));
    };
    let names = dns_names(leaf).map_err(|r| cert_err(&paths.cert, r))?;
    if names.is_empty() {
        return Err(TlsError::NoNames {
            path: paths.cert.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| cert_err(&paths.key, e.to_string()))?;
    let certified = certified_key(chain, key)?;
    Ok((names, certified))
}

/// Builds a `CertifiedKey` with the aws-lc-rs key loader, checking that key and certificate match.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let provider = aws_lc_rs::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)?;
    Ok(certified)
}

/// DNS names in the certificate's subjectAltName extension.
pub fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The certificate's notAfter, as Unix seconds.
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Loads every configured certificate into a table.
pub fn load_table(certs: &[CertificatePaths]) -> Result<CertTable, TlsError> {
    let mut table = CertTable::default();
    for paths in certs {
        let (names, key) = load_certificate(paths)?;
        if let (Some(name), Some(expiry)) = (names.first(), key.cert.first().and_then(not_after)) {
            crate::metrics::cert_expiry(name, expiry);
        }
        table.insert(&names, Arc::new(key));
    }
    Ok(table)
}

/// The server configuration: TLS 1.2 and 1.3 only, our ALPN list, certificates from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_SSH.to_vec()];
    Ok(Arc::new(config))
}

/// What the handshake settled, for routing and the connection span.
#[derive(Debug, Clone, Default)]
pub struct Negotiated {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
}

/// What the TLS stage ended with.
pub enum Accepted<S> {
    Stream(Box<TlsStream<S>>, Negotiated),
    /// An ACME TLS-ALPN-01 validation was answered; the connection is done.
    AcmeChallenge,
}

/// Reads the ClientHello and finishes the handshake, or answers a pending TLS-ALPN-01 challenge
/// when the ClientHello offers `acme-tls/1`.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: Arc<ServerConfig>,
    challenges: &Challenges,
) -> Result<Accepted<S>, TlsError> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
        .await
        .map_err(|e| {
            crate::metrics::tls_handshake("error", "unknown", "none", 0.0);
            TlsError::Handshake(e)
        })?;
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let acme = hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
    if let (true, Some(name)) = (acme, sni.as_deref()) {
        return answer_challenge(start, challenges, name).await;
    }
    let started = std::time::Instant::now();
    let tls = match start.into_stream(config).await {
        Ok(tls) => tls,
        Err(e) => {
            crate::metrics::tls_handshake("error", "unknown", "none", 0.0);
            return Err(TlsError::Handshake(e));
        }
    };
    let conn = tls.get_ref().1;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "other",
    };
    let alpn_label = match alpn.as_deref() {
        Some(ALPN_H2) => "h2",
        Some(ALPN_HTTP1) => "http/1.1",
        Some(ALPN_SSH) => "ssh",
        _ => "none",
    };
    crate::metrics::tls_handshake("ok", version, alpn_label, started.elapsed().as_secs_f64());
    Ok(Accepted::Stream(Box::new(tls), Negotiated { sni, alpn }))
}

async fn answer_challenge<S: AsyncRead + AsyncWrite + Unpin>(
    start: tokio_rustls::StartHandshake<S>,
    challenges: &Challenges,
    name: &str,
) -> Result<Accepted<S>, TlsError> {
    let Some(config) = challenges.tls_alpn_config(name) else {
        tracing::info!(
            name,
            "acme-tls/1 offered but no challenge is pending for this name"
        );
        return Err(TlsError::NoChallenge);
    };
    let mut tls = start.into_stream(config).await.map_err(TlsError::Handshake)?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    tracing::info!(name, "answered an ACME TLS-ALPN-01 validation");
    Ok(Accepted::AcmeChallenge)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn key_for(name: &str) -> Arc<CertifiedKey> {
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let key = PrivateKeyDer::try_from(kp.serialize_der()).unwrap();
        Arc::new(certified_key(vec![cert.der().clone()], key).unwrap())
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let (first, exact, wild) = (key_for("a.test"), key_for("gw.test"), key_for("*.gw.test"));
        let mut t = CertTable::default();
        t.insert(&["a.test".into()], first.clone());
        t.insert(&["*.gw.test".into()], wild.clone());
        t.insert(&["GW.test".into()], exact.clone());
        let pick = |sni| t.lookup(sni).unwrap();
        assert!(Arc::ptr_eq(&pick(Some("gw.test")), &exact));
        assert!(Arc::ptr_eq(&pick(Some("App-X.GW.test")), &wild));
        assert!(
            Arc::ptr_eq(&pick(Some("a.b.gw.test")), &first),
            "wildcards span one label"
        );
        assert!(Arc::ptr_eq(&pick(None), &first));
        assert!(Arc::ptr_eq(&pick(Some("unknown.example")), &first));
    }

    #[test]
    fn names_come_from_the_san() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".into(), "*.x.test".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        assert_eq!(dns_names(cert.der()).unwrap(), vec!["x.test", "*.x.test"]);
    }
}
