//! The SSH host key: loaded from disk, or generated (Ed25519, mode 0600) on first start so the
//! fingerprint users pin stays the same across restarts.

use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey};

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read SSH host key {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write SSH host key {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Loads the host key at `path`, generating it first when the file does not exist.
pub(crate) fn load_or_generate(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let key = if path.exists() {
        russh::keys::load_secret_key(path, None).map_err(|e| HostKeyError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
    } else {
        let key = generate().map_err(|reason| HostKeyError::Write {
            path: path.to_owned(),
            reason,
        })?;
        write_private(path, &key).map_err(|reason| HostKeyError::Write {
            path: path.to_owned(),
            reason,
        })?;
        tracing::info!(path = %path.display(), "generated a new SSH host key");
        key
    };
    tracing::info!(fingerprint = %fingerprint(&key), "SSH host key");
    Ok(key)
}

fn generate() -> Result<PrivateKey, String> {
    let mut seed = [0u8; 32];
    aws_lc_rs::rand::fill(&mut seed).map_err(|_| "no randomness available".to_string())?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

fn write_private(path: &Path, key: &PrivateKey) -> Result<(), String> {
    let pem = key.to_openssh(LineEnding::LF).map_err(|e| e.to_string())?;
    crate::secret_file::write_secret(path, pem.as_bytes()).map_err(|e| e.to_string())
}

/// The key's `SHA256:` fingerprint, as `ssh` shows it: what users pin.
pub(crate) fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}
