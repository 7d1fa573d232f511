//! A local CA: `edgemux dev` generates one with a `localhost` certificate, and `[tls] local_ca`
//! mints a certificate per tunnel host on first use (development, private deployments with their
//! own CA). Also the self-signed stand-in served before ACME has issued anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::CertificatePaths;
use crate::secret_file;

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("cannot generate the development certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Files of the development CA under `dir`.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: CertificatePaths,
    pub leaf: CertificatePaths,
}

/// Creates (once) a local CA and a certificate for `localhost` signed by it. Tunnel hosts get
/// certificates minted by [`LocalCa`] on first use: clients refuse a `*.localhost` wildcard
/// (a wildcard directly under a top-level name).
pub fn ensure_dev_certs(dir: &Path) -> Result<DevCerts, DevCertError> {
    let files = DevCerts {
        ca: CertificatePaths {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
        },
        leaf: CertificatePaths {
            cert: dir.join("localhost.pem"),
            key: dir.join("localhost.key"),
        },
    };
    let all = [&files.ca.cert, &files.ca.key, &files.leaf.cert, &files.leaf.key];
    if all.iter().all(|p| p.is_file()) {
        return Ok(files);
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "edgemux development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf_params("localhost")?.signed_by(&leaf_key, &issuer)?;

    let write = |path: &Path, bytes: &[u8], secret: bool| {
        let res = if secret {
            secret_file::write_secret(path, bytes)
        } else {
            secret_file::write_file(path, bytes, 0o644)
        };
        res.map_err(|source| DevCertError::Write {
            path: path.to_owned(),
            source,
        })
    };
    let chain = leaf_cert.pem() + &ca_cert.pem();
    write(&files.ca.key, ca_key_pem.as_bytes(), true)?;
    write(&files.ca.cert, ca_cert.pem().as_bytes(), false)?;
    write(&files.leaf.key, leaf_key.serialize_pem().as_bytes(), true)?;
    write(&files.leaf.cert, chain.as_bytes(), false)?;
    Ok(files)
}

/// A self-signed certificate for `host`: served before any real certificate exists.
pub fn self_signed(host: &str) -> Result<CertifiedKey, String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = leaf_params(host)
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::try_from(key.serialize_der())?;
    super::certs::certified_key(vec![cert.der().clone()], der).map_err(|e| e.to_string())
}

fn leaf_params(host: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut leaf = CertificateParams::new(vec![host.to_string()])?;
    leaf.distinguished_name.push(DnType::CommonName, host);
    Ok(leaf)
}

/// Most minted certificates kept; past this the cache starts over (they are cheap to mint).
const MAX_MINTED: usize = 4096;

/// A local CA that mints a certificate for any tunnel host under the domain on first use
/// (`[tls] local_ca`): development, and private deployments with their own CA.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    minted: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalCa")
    }
}

impl LocalCa {
    pub fn load(paths: &CertificatePaths) -> Result<Self, super::TlsError> {
        let err = |path: &Path, reason: String| super::TlsError::Certificate {
            path: path.display().to_string(),
            reason,
        };
        let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| err(path, e.to_string()));
        let key = KeyPair::from_pem(&read(&paths.key)?).map_err(|e| err(&paths.key, e.to_string()))?;
        let ca_pem = read(&paths.cert)?;
        let ca_der =
            CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| err(&paths.cert, e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key).map_err(|e| err(&paths.cert, e.to_string()))?;
        Ok(Self {
            issuer,
            ca_der,
            minted: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate for `host`, minted on first use.
    pub fn certificate_for(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let cached = self
            .minted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .cloned();
        if cached.is_some() {
            return cached;
        }
        // Minted outside the lock: a key generation must not hold up every other handshake.
        let key = self
            .mint(host)
            .map_err(|e| tracing::warn!(host, error = %e, "cannot mint a certificate"))
            .ok()?;
        let mut minted = self.minted.lock().unwrap_or_else(|p| p.into_inner());
        if minted.len() >= MAX_MINTED {
            minted.clear();
        }
        minted.insert(host.to_owned(), key.clone());
        Some(key)
    }

    fn mint(&self, host: &str) -> Result<Arc<CertifiedKey>, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = leaf_params(host)
            .and_then(|p| p.signed_by(&key, &self.issuer))
            .map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::try_from(key.serialize_der())?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        super::certs::certified_key(chain, der)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn dev_certs_are_made_once_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_dev_certs(dir.path()).unwrap();
        let mode = std::fs::metadata(&files.leaf.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let first = std::fs::read(&files.leaf.cert).unwrap();
        ensure_dev_certs(dir.path()).unwrap();
        assert_eq!(first, std::fs::read(&files.leaf.cert).unwrap());
        let issued = super::super::certs::load_certificate(&files.leaf).unwrap();
        assert_eq!(issued.names, vec!["localhost"]);
    }

    #[test]
    fn local_ca_mints_once_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_dev_certs(dir.path()).unwrap();
        let ca = LocalCa::load(&files.ca).unwrap();
        let a = ca.certificate_for("app-abcdefgh.localhost").unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &ca.certificate_for("app-abcdefgh.localhost").unwrap()
        ));
        let names = super::super::certs::dns_names(&a.cert[0]).unwrap();
        assert_eq!(names, vec!["app-abcdefgh.localhost"]);
        assert_eq!(a.cert.len(), 2, "chain carries the CA");
    }
}
