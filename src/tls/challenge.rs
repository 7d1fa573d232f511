//! Pending ACME challenge answers: the ACME client publishes them, the TLS stage answers
//! TLS-ALPN-01 (RFC 8737) and the plain-HTTP path answers HTTP-01. It lives with the TLS stage,
//! so neither TLS nor HTTP imports the ACME client.
//!
//! In a cluster the replica that orders is not always the one the CA's validation reaches: on a
//! miss, one bounded lookup ([`Fetch`], handed in by the ACME client) asks the shared store,
//! where the orderer wrote the answer before telling the CA to validate. The TLS stage has the
//! ClientHello before the handshake, so the lookup happens before any certificate is chosen.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// The ALPN protocol a TLS-ALPN-01 validation offers (RFC 8737 §6.2).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Lookups of the shared store on a miss, at once: each is one GET bounded by
/// [`FETCH_TIMEOUT`], and validations come a few per order; more than this is someone probing.
const MAX_FETCHES: usize = 16;
/// One lookup on a miss; the CA waits longer than this for an answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// ACME tokens are base64url of at least 128 bits (RFC 8555 §8.1); longer ones are not looked up.
const MAX_TOKEN: usize = 128;

/// A pending answer as another replica published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    /// HTTP-01, by token: answered with the key authorization.
    Http01(String),
    /// TLS-ALPN-01, by name: answered with the hex SHA-256 of the key authorization.
    TlsAlpn01(String),
}

/// Looks a pending answer up elsewhere (the cluster store); `None` when there is none.
pub(crate) type Fetch =
    Arc<dyn Fn(Pending) -> Pin<Box<dyn Future<Output = Option<String>> + Send>> + Send + Sync>;

pub(crate) struct Challenges {
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    http01: Mutex<HashMap<String, String>>,
    fetch: OnceLock<Fetch>,
    fetching: tokio::sync::Semaphore,
}

impl Default for Challenges {
    fn default() -> Self {
        Self {
            tls_alpn: Mutex::default(),
            http01: Mutex::default(),
            fetch: OnceLock::new(),
            fetching: tokio::sync::Semaphore::new(MAX_FETCHES),
        }
    }
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("fetch", &self.fetch.get().is_some())
            .finish_non_exhaustive()
    }
}

/// A self-signed certificate for `domain` carrying the critical acmeIdentifier extension with
/// the SHA-256 of the key authorization (RFC 8737 §3).
fn alpn_certificate(domain: &str, key_authorization_digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    if key_authorization_digest.len() != 32 {
        return Err("the key authorization digest must be SHA-256".into());
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(vec![domain.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(key_authorization_digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::try_from(key.serialize_der())?;
    // Built directly: rustls' consistency check (`with_single_cert`, `CertifiedKey::from_der`)
    // refuses the critical extension it does not know.
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
}

fn alpn_config(key: Arc<CertifiedKey>) -> Option<Arc<ServerConfig>> {
    let mut config = super::builder().ok()?.with_cert_resolver(Arc::new(Fixed(key)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Some(Arc::new(config))
}

fn looks_like_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn looks_like_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl Challenges {
    /// Publishes the TLS-ALPN-01 answer for `domain` (see [`alpn_certificate`]).
    pub(crate) fn add_tls_alpn(&self, domain: &str, key_authorization_digest: &[u8]) -> Result<(), String> {
        let certified = alpn_certificate(domain, key_authorization_digest)?;
        lock(&self.tls_alpn).insert(domain.to_ascii_lowercase(), certified);
        Ok(())
    }

    /// Where to look on a miss (set once, by the ACME client of a cluster).
    pub(crate) fn set_fetch(&self, fetch: Fetch) {
        let _ = self.fetch.set(fetch);
    }

    /// One bounded lookup elsewhere, when a fetcher is set and a lookup slot is free.
    async fn fetch(&self, pending: Pending) -> Option<String> {
        let fetch = self.fetch.get()?;
        let _permit = self.fetching.try_acquire().ok()?;
        tokio::time::timeout(FETCH_TIMEOUT, fetch(pending)).await.ok()?
    }

    /// [`Self::http01`], else the answer another replica published.
    pub(crate) async fn http01_or_fetch(&self, token: &str) -> Option<String> {
        if let Some(local) = self.http01(token) {
            return Some(local);
        }
        if !looks_like_token(token) {
            return None;
        }
        self.fetch(Pending::Http01(token.to_owned())).await
    }

    /// [`Self::tls_alpn_config`], else one built from the answer another replica published.
    pub(crate) async fn tls_alpn_config_or_fetch(&self, domain: &str) -> Option<Arc<ServerConfig>> {
        if let Some(local) = self.tls_alpn_config(domain) {
            return Some(local);
        }
        if !looks_like_name(domain) {
            return None;
        }
        let hex = self
            .fetch(Pending::TlsAlpn01(domain.to_ascii_lowercase()))
            .await?;
        let digest = data_encoding::HEXLOWER_PERMISSIVE.decode(hex.as_bytes()).ok()?;
        alpn_config(alpn_certificate(domain, &digest).ok()?)
    }

    pub(crate) fn add_http01(&self, token: &str, key_authorization: &str) {
        lock(&self.http01).insert(token.to_owned(), key_authorization.to_owned());
    }

    pub(crate) fn remove(&self, domain: &str, token: &str) {
        lock(&self.tls_alpn).remove(&domain.to_ascii_lowercase());
        lock(&self.http01).remove(token);
    }

    /// The key authorization to answer `GET /.well-known/acme-challenge/{token}` with.
    pub(crate) fn http01(&self, token: &str) -> Option<String> {
        lock(&self.http01).get(token).cloned()
    }

    /// A server config that answers the TLS-ALPN-01 challenge for `domain`, if one is pending.
    pub(crate) fn tls_alpn_config(&self, domain: &str) -> Option<Arc<ServerConfig>> {
        let key = lock(&self.tls_alpn).get(&domain.to_ascii_lowercase()).cloned()?;
        alpn_config(key)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tls_alpn_certificate_has_critical_acme_identifier() {
        let c = Challenges::default();
        c.add_tls_alpn("Gw.Test", &[7u8; 32]).unwrap();
        assert!(c.tls_alpn_config("gw.test").is_some());
        let key = lock(&c.tls_alpn).get("gw.test").cloned().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&key.cert[0]).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(ext.critical);
        // OCTET STRING (0x04) of 32 bytes.
        assert_eq!(&ext.value[..2], &[0x04, 32]);
        c.remove("gw.test", "t");
        assert!(c.tls_alpn_config("gw.test").is_none());
    }

    #[tokio::test]
    async fn a_miss_asks_the_fetcher_once_with_a_plausible_id() {
        let c = Challenges::default();
        assert_eq!(c.http01_or_fetch("tok").await, None, "no fetcher: a miss");
        let asked = Arc::new(Mutex::new(Vec::new()));
        let seen = asked.clone();
        c.set_fetch(Arc::new(move |p: Pending| {
            lock(&seen).push(p.clone());
            Box::pin(async move {
                match p {
                    Pending::Http01(t) if t == "tok" => Some("tok.thumb".to_owned()),
                    Pending::TlsAlpn01(n) if n == "gw.test" => Some("07".repeat(32)),
                    _ => None,
                }
            })
        }));
        assert_eq!(c.http01_or_fetch("tok").await.as_deref(), Some("tok.thumb"));
        assert_eq!(c.http01_or_fetch("../etc").await, None);
        assert!(c.tls_alpn_config_or_fetch("GW.test").await.is_some());
        assert!(c.tls_alpn_config_or_fetch("other.test").await.is_none());
        assert_eq!(
            *lock(&asked),
            [
                Pending::Http01("tok".into()),
                Pending::TlsAlpn01("gw.test".into()),
                Pending::TlsAlpn01("other.test".into())
            ],
            "a malformed token is not looked up"
        );
    }

    #[test]
    fn http01_tokens() {
        let c = Challenges::default();
        c.add_http01("tok", "tok.thumb");
        assert_eq!(c.http01("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(c.http01("other"), None);
    }
}
