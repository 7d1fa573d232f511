//! Pending ACME challenge answers: the ACME client publishes them, the TLS stage answers
//! TLS-ALPN-01 (RFC 8737) and the plain-HTTP path answers HTTP-01. It lives with the TLS stage,
//! so neither TLS nor HTTP imports the ACME client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// The ALPN protocol a TLS-ALPN-01 validation offers (RFC 8737 §6.2).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Debug, Default)]
pub(crate) struct Challenges {
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    http01: Mutex<HashMap<String, String>>,
}

impl Challenges {
    /// Publishes the TLS-ALPN-01 answer for `domain`: a self-signed certificate for it carrying
    /// the critical acmeIdentifier extension with the SHA-256 of the key authorization.
    pub(crate) fn add_tls_alpn(&self, domain: &str, key_authorization_digest: &[u8]) -> Result<(), String> {
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
        let certified = CertifiedKey::new(vec![cert.der().clone()], signing);
        lock(&self.tls_alpn).insert(domain.to_ascii_lowercase(), Arc::new(certified));
        Ok(())
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
        let mut config = super::builder().ok()?.with_cert_resolver(Arc::new(Fixed(key)));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Some(Arc::new(config))
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

    #[test]
    fn http01_tokens() {
        let c = Challenges::default();
        c.add_http01("tok", "tok.thumb");
        assert_eq!(c.http01("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(c.http01("other"), None);
    }
}
