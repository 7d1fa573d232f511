//! Private keys and account credentials kept in a shared store are sealed: AES-256-GCM under a
//! key derived from the cluster secret (label `seal`), a random 96-bit nonce per value, and the
//! store key as additional data, so a sealed value moved to another key does not open. Read
//! access to the store alone does not leak a key.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Why a sealed value did not open (or could not be sealed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SealError {
    #[error("the sealed value is not base64 of a nonce and a ciphertext")]
    Malformed,
    #[error("the sealed value does not open under this cluster's key (tampered, moved, or another secret)")]
    Open,
    #[error("no randomness from the system")]
    Random,
}

/// Seals and opens values with one key. Cheap to share; the key is never printed.
pub(crate) struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(redacted)")
    }
}

impl Sealer {
    /// `key`: 32 bytes derived for sealing (`ClusterSecret::derive(Label::Seal)`).
    pub(crate) fn new(key: &[u8; 32]) -> Option<Self> {
        let unbound = UnboundKey::new(&AES_256_GCM, key).ok()?;
        Some(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    /// base64(nonce ‖ ciphertext ‖ tag), bound to `name` (the store key).
    pub(crate) fn seal(&self, name: &str, plain: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(data_encoding::BASE64.encode(&out))
    }

    /// The plain bytes, if `sealed` was sealed under this key for `name` and not changed since.
    pub(crate) fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let raw = data_encoding::BASE64
            .decode(sealed.as_bytes())
            .map_err(|_| SealError::Malformed)?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Malformed);
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Malformed)?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| SealError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_tamper_rejection() {
        let s = Sealer::new(&[7u8; 32]).unwrap();
        let sealed = s.seal("certs/gw.test", b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert_eq!(
            s.open("certs/gw.test", &sealed).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert_ne!(
            sealed,
            s.seal("certs/gw.test", b"-----BEGIN PRIVATE KEY-----").unwrap(),
            "fresh nonce"
        );
        assert_eq!(
            s.open("certs/other.test", &sealed),
            Err(SealError::Open),
            "moved to another key"
        );
        let other = Sealer::new(&[8u8; 32]).unwrap();
        assert_eq!(
            other.open("certs/gw.test", &sealed),
            Err(SealError::Open),
            "another secret"
        );
        let mut raw = data_encoding::BASE64.decode(sealed.as_bytes()).unwrap();
        for i in [0, NONCE_LEN, raw.len() - 1] {
            raw[i] ^= 1;
            let flipped = data_encoding::BASE64.encode(&raw);
            assert_eq!(
                s.open("certs/gw.test", &flipped),
                Err(SealError::Open),
                "bit {i} flipped"
            );
            raw[i] ^= 1;
        }
        assert_eq!(s.open("certs/gw.test", "not base64!"), Err(SealError::Malformed));
        assert_eq!(s.open("certs/gw.test", "AAAA"), Err(SealError::Malformed));
    }
}
