//! The cluster secret (`[cluster] secret_file`): at least 32 random bytes, written as hex,
//! identical on every replica and readable by the owner only. Every key the cluster uses is
//! derived from it with HKDF-SHA256 under its own label, so no two uses share a key.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::hkdf;

/// The shortest secret accepted: 256 bits (`config::cluster_defaults::MIN_SECRET_BYTES`).
pub(crate) const MIN_SECRET_BYTES: usize = crate::config::cluster_defaults::MIN_SECRET_BYTES;
/// The largest secret file read: a secret is a line of hex; anything much longer is not one.
const MAX_SECRET_FILE: u64 = 4096;
/// Bytes of randomness in a generated secret.
const GENERATED_BYTES: usize = 32;
/// HKDF salt: names the scheme, so a secret reused elsewhere still gives other keys here.
const HKDF_SALT: &[u8] = b"edgemux cluster secret v1";

/// What a derived key is for; each gets a distinct HKDF label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Label {
    /// Authenticates every peer header (HMAC-SHA256).
    PeerHmac,
    /// The seed of the peer link's Ed25519 CA key (`tls = "derived"`).
    PeerCa,
    /// Seals private keys kept in the store (AES-256-GCM).
    Seal,
}

impl Label {
    const ALL: [Label; 3] = [Label::PeerHmac, Label::PeerCa, Label::Seal];

    fn info(self) -> &'static [u8] {
        match self {
            Label::PeerHmac => b"edgemux peer-hmac",
            Label::PeerCa => b"edgemux peer-ca",
            Label::Seal => b"edgemux seal",
        }
    }

    fn index(self) -> usize {
        match self {
            Label::PeerHmac => 0,
            Label::PeerCa => 1,
            Label::Seal => 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the cluster secret {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "the cluster secret {} is writable by its group or accessible by others (mode {mode:04o}): \
         run `chmod 600 {}` (in Kubernetes, mount the Secret with defaultMode 0440 or stricter)",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the cluster secret {} is not hex (make one with `edgemux cluster-secret`)", path.display())]
    NotHex { path: PathBuf },
    #[error(
        "the cluster secret {} holds {len} bytes; at least {MIN_SECRET_BYTES} are needed \
         (make one with `edgemux cluster-secret`)",
        path.display()
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("the cluster secret {} is larger than {MAX_SECRET_FILE} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("no randomness from the system")]
    Random,
    #[error("key derivation failed")]
    Derive,
}

impl SecretError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Permissions { .. } => "permissions",
            Self::NotHex { .. } => "not_hex",
            Self::TooShort { .. } => "too_short",
            Self::TooLarge { .. } => "too_large",
            Self::Random => "random",
            Self::Derive => "derive",
        }
    }
}

/// The keys derived from the cluster secret. The secret itself is not kept.
pub(crate) struct ClusterSecret {
    keys: [[u8; 32]; 3],
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(redacted)")
    }
}

impl ClusterSecret {
    /// Reads `path`: hex (surrounding whitespace ignored) of at least [`MIN_SECRET_BYTES`] bytes,
    /// in a file that neither group nor others may access, as ssh demands of private keys.
    pub(crate) fn load(path: &Path) -> Result<Self, SecretError> {
        let read = |source| SecretError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        // Group read is allowed: a Kubernetes Secret mounted under `fsGroup`, and a systemd
        // credential shared through an ACL, show as 0440.
        if mode & 0o027 != 0 {
            return Err(SecretError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_SECRET_FILE {
            return Err(SecretError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read(path).map_err(read)?;
        let hex = text.trim_ascii();
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(hex)
            .map_err(|_| SecretError::NotHex {
                path: path.to_owned(),
            })?;
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                path: path.to_owned(),
                len: bytes.len(),
            });
        }
        Self::from_bytes(&bytes)
    }

    /// Derives every key from `secret` at once, so [`derive`](Self::derive) cannot fail later.
    pub(crate) fn from_bytes(secret: &[u8]) -> Result<Self, SecretError> {
        let mut keys = [[0u8; 32]; 3];
        for label in Label::ALL {
            keys[label.index()] = hkdf_sha256(HKDF_SALT, secret, label.info())?;
        }
        Ok(Self { keys })
    }

    /// The 32-byte key for `label`.
    pub(crate) fn derive(&self, label: Label) -> [u8; 32] {
        self.keys[label.index()]
    }
}

/// HKDF-SHA256 (RFC 5869), 32 bytes of output.
fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8]) -> Result<[u8; 32], SecretError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = [0u8; 32];
    // HKDF_SHA256 as the length type asks for one hash length: 32 bytes.
    prk.expand(&[info], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| SecretError::Derive)?;
    Ok(out)
}

/// Loads the secret at `path` only to say whether it would be accepted: `edgemux check` reports
/// a short, malformed or world-readable secret before `serve` would refuse it.
pub fn check(path: &Path) -> Result<(), SecretError> {
    ClusterSecret::load(path).map(drop)
}

/// A new secret: 32 random bytes as hex, what `edgemux cluster-secret` prints.
pub fn generate() -> Result<String, SecretError> {
    let mut bytes = [0u8; GENERATED_BYTES];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| SecretError::Random)?;
    Ok(data_encoding::HEXLOWER.encode(&bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("cluster.key");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_generated_secret_loads_and_derives_distinct_keys() {
        let dir = tempfile::tempdir().unwrap();
        let text = generate().unwrap();
        assert_eq!(text.len(), 2 * GENERATED_BYTES);
        assert_ne!(text, generate().unwrap(), "random");
        let path = write(dir.path(), &format!("  {text}\n\n"), 0o600);
        let secret = ClusterSecret::load(&path).unwrap();
        let keys = Label::ALL.map(|l| secret.derive(l));
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[1], keys[2]);
        assert_ne!(keys[0], keys[2]);
        let again = ClusterSecret::load(&path).unwrap();
        assert_eq!(again.derive(Label::PeerHmac), keys[0], "deterministic");
        let upper = write(dir.path(), &text.to_ascii_uppercase(), 0o400);
        assert_eq!(ClusterSecret::load(&upper).unwrap().derive(Label::Seal), keys[2]);
        assert_eq!(format!("{secret:?}"), "ClusterSecret(redacted)");
    }

    #[test]
    fn bad_secrets_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let short = write(dir.path(), &"ab".repeat(31), 0o600);
        let e = ClusterSecret::load(&short).unwrap_err();
        assert!(matches!(e, SecretError::TooShort { len: 31, .. }), "{e}");
        assert!(e.to_string().contains("cluster.key"), "{e}");
        let not_hex = write(dir.path(), &"zz".repeat(32), 0o600);
        assert_eq!(ClusterSecret::load(&not_hex).unwrap_err().reason(), "not_hex");
        let odd = write(dir.path(), &"a".repeat(65), 0o600);
        assert_eq!(ClusterSecret::load(&odd).unwrap_err().reason(), "not_hex");
        let missing = ClusterSecret::load(&dir.path().join("nope")).unwrap_err();
        assert_eq!(missing.reason(), "read");
        let big = write(dir.path(), &"ab".repeat(4096), 0o600);
        assert_eq!(ClusterSecret::load(&big).unwrap_err().reason(), "too_large");
    }

    #[test]
    fn a_secret_others_can_read_or_its_group_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o604, 0o620, 0o660, 0o601] {
            let path = write(dir.path(), &generate().unwrap(), mode);
            let e = ClusterSecret::load(&path).unwrap_err();
            assert_eq!(e.reason(), "permissions", "mode {mode:o}");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        for mode in [0o640, 0o440, 0o400] {
            let path = write(dir.path(), &generate().unwrap(), mode);
            assert!(ClusterSecret::load(&path).is_ok(), "mode {mode:o} is fine");
        }
    }

    #[test]
    fn hkdf_matches_rfc5869_case_1() {
        // RFC 5869 A.1; the first 32 bytes of its 42-byte OKM.
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let okm = hkdf_sha256(&salt, &ikm, &info).unwrap();
        assert_eq!(
            data_encoding::HEXLOWER.encode(&okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }
}
