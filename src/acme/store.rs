//! ACME state on disk under `<certs_dir>/acme/`: the account credentials (one file per directory
//! URL) and each issued chain with its key, all written 0600 with write-then-rename.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::secret_file::write_secret;
use crate::tls::certs::{parse_pem, Issued};

/// A short name for an ACME directory URL: 12 hex digits of its SHA-256.
pub(crate) fn directory_id(directory_url: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, directory_url.as_bytes());
    data_encoding::HEXLOWER.encode(&digest.as_ref()[..6])
}

#[derive(Debug, Clone)]
pub(crate) struct Store {
    dir: PathBuf,
}

impl Store {
    pub(crate) fn new(certs_dir: &Path) -> Self {
        Self {
            dir: certs_dir.join("acme"),
        }
    }

    fn account_path(&self, directory_url: &str) -> PathBuf {
        self.dir
            .join(format!("account-{}.json", directory_id(directory_url)))
    }

    pub(crate) fn load_account(&self, directory_url: &str) -> Option<String> {
        std::fs::read_to_string(self.account_path(directory_url)).ok()
    }

    pub(crate) fn save_account(&self, directory_url: &str, json: &str) -> std::io::Result<()> {
        write_secret(&self.account_path(directory_url), json.as_bytes())
    }

    fn cert_paths(&self, domain: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{domain}.crt")),
            self.dir.join(format!("{domain}.key")),
        )
    }

    pub(crate) fn save_cert(&self, domain: &str, chain_pem: &str, key_pem: &str) -> std::io::Result<()> {
        let (crt, key) = self.cert_paths(domain);
        write_secret(&key, key_pem.as_bytes())?;
        write_secret(&crt, chain_pem.as_bytes())
    }

    /// The stored certificate for `domain`, if it parses and has not expired.
    pub(crate) fn load_cert(&self, domain: &str, now: SystemTime) -> Option<Issued> {
        let (chain, key) = self.load_pem(domain)?;
        let issued = parse_pem(chain.as_bytes(), key.as_bytes()).ok()?;
        (issued.not_after > now).then_some(issued)
    }

    /// The chain and key files of `domain`, as text.
    pub(crate) fn load_pem(&self, domain: &str) -> Option<(String, String)> {
        let (crt, key) = self.cert_paths(domain);
        Some((
            std::fs::read_to_string(crt).ok()?,
            std::fs::read_to_string(key).ok()?,
        ))
    }
}
