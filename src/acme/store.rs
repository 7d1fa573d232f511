//! ACME state on disk under `<certs_dir>/acme/`: the account credentials (one file per directory
//! URL) and each issued chain with its key, all written 0600 with write-then-rename.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::certs::write_secret;

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// A certificate in service, with what scheduling needs to know about it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub key: std::sync::Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Store {
    pub fn new(certs_dir: &Path) -> Self {
        Self {
            dir: certs_dir.join("acme"),
        }
    }

    fn account_path(&self, directory_url: &str) -> PathBuf {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, directory_url.as_bytes());
        let id = data_encoding::HEXLOWER.encode(&digest.as_ref()[..6]);
        self.dir.join(format!("account-{id}.json"))
    }

    pub fn load_account(&self, directory_url: &str) -> Option<String> {
        std::fs::read_to_string(self.account_path(directory_url)).ok()
    }

    pub fn save_account(&self, directory_url: &str, json: &str) -> std::io::Result<()> {
        write_secret(&self.account_path(directory_url), json.as_bytes())
    }

    fn cert_paths(&self, domain: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{domain}.crt")),
            self.dir.join(format!("{domain}.key")),
        )
    }

    pub fn save_cert(&self, domain: &str, chain_pem: &str, key_pem: &str) -> std::io::Result<()> {
        let (crt, key) = self.cert_paths(domain);
        write_secret(&key, key_pem.as_bytes())?;
        write_secret(&crt, chain_pem.as_bytes())
    }

    /// The stored certificate for `domain`, if it parses and has not expired.
    pub fn load_cert(&self, domain: &str, now: SystemTime) -> Option<Issued> {
        let (crt, key) = self.cert_paths(domain);
        let chain = std::fs::read(crt).ok()?;
        let key = std::fs::read(key).ok()?;
        let issued = parse_issued(&chain, &key).ok()?;
        (issued.not_after > now).then_some(issued)
    }
}

/// Parses a PEM chain and key into a servable certificate with its validity.
pub fn parse_issued(chain_pem: &[u8], key_pem: &[u8]) -> Result<Issued, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let leaf = chain.first().ok_or("empty chain")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let validity = parsed.validity();
    let to_time = |t: i64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
    let not_before = to_time(validity.not_before.timestamp());
    let not_after = to_time(validity.not_after.timestamp());
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| e.to_string())?;
    let certified = crate::tls::certified_key(chain, key).map_err(|e| e.to_string())?;
    Ok(Issued {
        key: std::sync::Arc::new(certified),
        not_before,
        not_after,
    })
}
