//! Certificates as the TLS stage serves them: PEM chains and keys parsed into rustls'
//! `CertifiedKey` (one routine for configured files and ACME's stored ones), their names and
//! validity, and the [`CertTable`] that picks one by name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::TlsError;
use crate::config::CertificatePaths;

/// The certificates in service, by name. Swapped whole, so a reload is atomic for new handshakes
/// and leaves established connections alone.
#[derive(Debug, Default)]
pub(crate) struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain: `*.gw.test` is stored under `gw.test`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertTable {
    /// Adds a certificate under each of its names; the first certificate added is the default.
    pub(crate) fn insert(&mut self, names: &[String], key: Arc<CertifiedKey>) {
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
    pub(crate) fn set_default(&mut self, key: Arc<CertifiedKey>) {
        self.default = Some(key);
    }

    /// The most specific certificate for `sni`: exact, then a wildcard one label up, then the default.
    pub(crate) fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        sni.and_then(|s| self.lookup_named(s))
            .or_else(|| self.default.clone())
    }

    /// A certificate that names `sni` (exactly or by wildcard), without falling back to the default.
    pub(crate) fn lookup_named(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.lookup_exact(sni).or_else(|| self.lookup_wildcard(sni))
    }

    pub(crate) fn lookup_exact(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.exact.get(&sni.to_ascii_lowercase()).cloned()
    }

    /// A wildcard certificate one label up (`*.gw.test` for `a.gw.test`).
    pub(crate) fn lookup_wildcard(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let sni = sni.to_ascii_lowercase();
        let (_, parent) = sni.split_once('.')?;
        self.wildcard.get(parent).cloned()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.default.is_none()
    }
}

/// A servable certificate with its validity (what renewal scheduling needs to know).
#[derive(Debug, Clone)]
pub(crate) struct Issued {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) names: Vec<String>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

/// Parses a PEM chain and key into a servable certificate: the one routine for configured files,
/// ACME's stored certificates and freshly issued ones. Errors say which half is at fault.
pub(crate) fn parse_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Issued, PemError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Chain(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| PemError::Chain("no certificate in file".into()))?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| PemError::Chain(e.to_string()))?;
    let validity = parsed.validity();
    let to_time = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let not_before = to_time(validity.not_before.timestamp());
    let not_after = to_time(validity.not_after.timestamp());
    let names = dns_names(leaf).map_err(PemError::Chain)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PemError::Key(e.to_string()))?;
    let key = certified_key(chain, key).map_err(|e| PemError::Key(e.to_string()))?;
    Ok(Issued {
        key: Arc::new(key),
        names,
        not_before,
        not_after,
    })
}

/// Which half of a certificate/key pair did not parse.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PemError {
    #[error("{0}")]
    Chain(String),
    #[error("{0}")]
    Key(String),
}

/// Loads a configured PEM chain and key; the certificate must name at least one DNS name.
pub(crate) fn load_certificate(paths: &CertificatePaths) -> Result<Issued, TlsError> {
    let cert_err = |path: &Path, reason: String| TlsError::Certificate {
        path: path.display().to_string(),
        reason,
    };
    let chain = std::fs::read(&paths.cert).map_err(|e| cert_err(&paths.cert, e.to_string()))?;
    let key = std::fs::read(&paths.key).map_err(|e| cert_err(&paths.key, e.to_string()))?;
    let issued = parse_pem(&chain, &key).map_err(|e| match e {
        PemError::Chain(r) => cert_err(&paths.cert, r),
        PemError::Key(r) => cert_err(&paths.key, r),
    })?;
    if issued.names.is_empty() {
        return Err(TlsError::NoNames {
            path: paths.cert.display().to_string(),
        });
    }
    Ok(issued)
}

/// Builds a `CertifiedKey` with the aws-lc-rs key loader, checking that key and certificate match.
pub(crate) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let provider = aws_lc_rs::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)?;
    Ok(certified)
}

/// DNS names in the certificate's subjectAltName extension.
pub(crate) fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
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

/// Unix seconds, for the certificate-expiry metric.
pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Loads every configured certificate into a table.
pub(crate) fn load_table(certs: &[CertificatePaths]) -> Result<CertTable, TlsError> {
    let mut table = CertTable::default();
    for paths in certs {
        let issued = load_certificate(paths)?;
        if let Some(name) = issued.names.first() {
            crate::metrics::cert_expiry(name, unix_secs(issued.not_after));
        }
        table.insert(&issued.names, issued.key);
    }
    Ok(table)
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

    #[test]
    fn pem_errors_name_the_half_at_fault() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x.test".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let (chain, key) = (cert.pem(), kp.serialize_pem());
        let issued = parse_pem(chain.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(issued.names, ["x.test"]);
        assert!(issued.not_before < issued.not_after);
        assert!(matches!(parse_pem(b"", key.as_bytes()), Err(PemError::Chain(_))));
        assert!(matches!(
            parse_pem(chain.as_bytes(), b"junk"),
            Err(PemError::Key(_))
        ));
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(
            matches!(
                parse_pem(chain.as_bytes(), other.as_bytes()),
                Err(PemError::Key(_))
            ),
            "a key that does not match the certificate is the key's fault"
        );
    }
}
