//! Client keys: the key id that namespaces tunnel hosts, and the `authorized_keys` set.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use russh::keys::{HashAlg, PublicKey};

use crate::names::KeyFingerprint;

/// A public key's identity: its SHA-256 fingerprint (the digest `ssh-keygen -lf` shows).
pub fn fingerprint(key: &PublicKey) -> KeyFingerprint {
    let fp = key.fingerprint(HashAlg::Sha256);
    let digest = <[u8; 32]>::try_from(fp.as_bytes()).unwrap_or_else(|_| {
        // A SHA-256 fingerprint is 32 bytes; should that ever change, hash what we were given.
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, fp.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    });
    KeyFingerprint::from_sha256(digest)
}

/// The key id of a public key, the short label its tunnel hosts carry.
pub fn key_id(key: &PublicKey) -> String {
    fingerprint(key).key_id()
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: not a public key: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Parses one OpenSSH public key line (`ssh-ed25519 AAAA… comment`, options prefix allowed).
pub fn parse_public_key_line(line: &str) -> Result<PublicKey, String> {
    let line = line.trim();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let at = fields
        .iter()
        .position(|f| f.starts_with("ssh-") || f.starts_with("ecdsa-") || f.starts_with("sk-"))
        .ok_or_else(|| "no key type (ssh-ed25519, ecdsa-sha2-…, ssh-rsa) found".to_string())?;
    let blob = fields.get(at + 1).ok_or("key type without key data")?;
    russh::keys::parse_public_key_base64(blob).map_err(|e| e.to_string())
}

/// Reads an `authorized_keys` file into the set of keys (by full fingerprint) it allows.
pub fn read_authorized_keys(path: &Path) -> Result<HashSet<KeyFingerprint>, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut ids = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let key = parse_public_key_line(line).map_err(|reason| KeysError::Parse {
            path: path.to_owned(),
            line: i + 1,
            reason,
        })?;
        ids.insert(fingerprint(&key));
    }
    Ok(ids)
}

/// Who may authenticate: anyone (open mode), or the keys of an `authorized_keys` file that is
/// re-read when it changes (looked at no more than every 2 s) or on SIGHUP.
#[derive(Debug)]
pub enum KeyPolicy {
    Open,
    File(AuthorizedKeys),
}

#[derive(Debug)]
pub struct AuthorizedKeys {
    path: PathBuf,
    /// The file's modification time when last read, and the keys it allowed then.
    state: ArcSwap<(Option<SystemTime>, Arc<HashSet<KeyFingerprint>>)>,
    /// When the file's mtime was last looked at: at most once per [`RECHECK_EVERY`].
    checked: std::sync::Mutex<Instant>,
}

/// A changed `authorized_keys` takes effect within this long (SIGHUP: at once), without a
/// `stat` on every authentication attempt.
const RECHECK_EVERY: Duration = Duration::from_secs(2);

impl AuthorizedKeys {
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let ids = read_authorized_keys(path)?;
        Ok(Self {
            path: path.to_owned(),
            state: ArcSwap::from_pointee((mtime(path), Arc::new(ids))),
            checked: std::sync::Mutex::new(Instant::now()),
        })
    }

    /// Re-reads the file if its modification time changed, or always when `force`. A file that no
    /// longer parses keeps the previous set in force and logs why.
    pub fn refresh(&self, force: bool) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if !force && checked.elapsed() < RECHECK_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        let now = mtime(&self.path);
        let stale = self.state.load().0 != now;
        if !(force || stale) {
            return;
        }
        match read_authorized_keys(&self.path) {
            Ok(ids) => {
                tracing::info!(path = %self.path.display(), keys = ids.len(), "authorized_keys reloaded");
                self.state.store(Arc::new((now, Arc::new(ids))));
            }
            Err(e) => {
                tracing::warn!(error = %e, "authorized_keys not reloaded; the previous keys stay in force");
                // Remember this version so a broken file is reported once, not on every login.
                let keys = self.state.load().1.clone();
                self.state.store(Arc::new((now, keys)));
            }
        }
    }

    pub fn allows(&self, key: &KeyFingerprint) -> bool {
        self.refresh(false);
        self.state.load().1.contains(key)
    }

    /// The keys in force (as last read; no re-read).
    pub fn keys(&self) -> Arc<HashSet<KeyFingerprint>> {
        self.state.load().1.clone()
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl KeyPolicy {
    pub fn allows(&self, key: &KeyFingerprint) -> bool {
        match self {
            Self::Open => true,
            Self::File(keys) => keys.allows(key),
        }
    }

    /// Re-reads the file if it changed (checked at most every couple of seconds), as a login
    /// does: for those who follow the keys in force without a login.
    pub fn refresh(&self) {
        if let Self::File(keys) = self {
            keys.refresh(false);
        }
    }

    pub fn reload(&self) {
        if let Self::File(keys) = self {
            keys.refresh(true);
        }
    }

    /// The keys allowed now; `None` in open mode (any key).
    pub fn keys(&self) -> Option<Arc<HashSet<KeyFingerprint>>> {
        match self {
            Self::Open => None,
            Self::File(keys) => Some(keys.keys()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL9UJGX+IcLv7evKDJzFMGiLFt4l2/P3lY/AT+Hh+BSB alice@laptop";

    #[test]
    fn key_id_is_stable_and_dns_safe() {
        let key = parse_public_key_line(ED25519).unwrap();
        let id = key_id(&key);
        assert!(crate::names::is_key_id(&id), "{id}");
        assert_eq!(id, key_id(&parse_public_key_line(ED25519).unwrap()));
    }

    #[test]
    fn fingerprint_is_what_ssh_keygen_prints() {
        let key = parse_public_key_line(ED25519).unwrap();
        assert_eq!(
            fingerprint(&key).to_string(),
            "SHA256:M1EHtmVEQRQ9PRm2LCsyjWSeNzct+SVx/135HLYdUM4"
        );
    }

    #[test]
    fn authorized_keys_refuse_a_key_whose_short_id_collides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ak");
        std::fs::write(
            &p,
            format!(
                "{ED25519}
"
            ),
        )
        .unwrap();
        let keys = AuthorizedKeys::load(&p).unwrap();
        let owner = fingerprint(&parse_public_key_line(ED25519).unwrap());
        assert!(keys.allows(&owner));
        assert!(!keys.allows(&owner.colliding()));
    }

    #[test]
    fn options_prefix_and_garbage() {
        let with_opts = format!("no-pty,command=\"x\" {ED25519}");
        assert!(parse_public_key_line(&with_opts).is_ok());
        assert!(parse_public_key_line("hello world").is_err());
        assert!(parse_public_key_line("ssh-ed25519").is_err());
        assert!(parse_public_key_line("ssh-ed25519 !!!!").is_err());
    }

    #[test]
    fn authorized_keys_file_reports_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ak");
        std::fs::write(&p, format!("# comment\n\n{ED25519}\nbogus line\n")).unwrap();
        match read_authorized_keys(&p) {
            Err(KeysError::Parse { line, .. }) => assert_eq!(line, 4),
            other => panic!("{other:?}"),
        }
        std::fs::write(&p, format!("{ED25519}\n")).unwrap();
        assert_eq!(read_authorized_keys(&p).unwrap().len(), 1);
    }
}
