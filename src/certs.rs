//! The certificate store on disk: secrets written 0600 with write-then-rename, and the local CA
//! plus `*.localhost` certificate that `edgemux dev` generates.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::config::CertificatePaths;

/// Writes `bytes` to `path` readable by the owner only; a crash never leaves a half-written file.
pub fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_file(path, bytes, 0o600)
}

pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("cannot generate the development certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Files of the development CA under `dir`.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca_cert: PathBuf,
    pub leaf: CertificatePaths,
}

/// Creates (once) a local CA and a certificate for `localhost` and `*.localhost` signed by it.
pub fn ensure_dev_certs(dir: &Path) -> Result<DevCerts, DevCertError> {
    let files = DevCerts {
        ca_cert: dir.join("ca.pem"),
        leaf: CertificatePaths {
            cert: dir.join("localhost.pem"),
            key: dir.join("localhost.key"),
        },
    };
    if files.ca_cert.is_file() && files.leaf.cert.is_file() && files.leaf.key.is_file() {
        return Ok(files);
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "edgemux development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "*.localhost".to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    let write = |path: &Path, bytes: &[u8], secret: bool| {
        let res = if secret {
            write_secret(path, bytes)
        } else {
            write_file(path, bytes, 0o644)
        };
        res.map_err(|source| DevCertError::Write {
            path: path.to_owned(),
            source,
        })
    };
    let chain = leaf_cert.pem() + &ca_cert.pem();
    write(&files.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write(&files.leaf.key, leaf_key.serialize_pem().as_bytes(), true)?;
    write(&files.leaf.cert, chain.as_bytes(), false)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dev_certs_are_made_once_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_dev_certs(dir.path()).unwrap();
        let mode = std::fs::metadata(&files.leaf.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let first = std::fs::read(&files.leaf.cert).unwrap();
        ensure_dev_certs(dir.path()).unwrap();
        assert_eq!(first, std::fs::read(&files.leaf.cert).unwrap());
        let (names, _) = crate::tls::load_certificate(&files.leaf).unwrap();
        assert_eq!(names, vec!["localhost", "*.localhost"]);
    }
}
