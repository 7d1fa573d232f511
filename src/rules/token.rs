//! Signed, expiring visitor tokens for `private` tunnels: `<expiry unix seconds>.<HMAC-SHA256 of
//! the host and expiry>` (base64url). A token names its host, so one tunnel's link opens no other.

use aws_lc_rs::hmac;
use data_encoding::BASE64URL_NOPAD;

/// Longest token read; longer ones are refused unparsed.
pub const MAX_TOKEN: usize = 96;
/// The cookie a redeemed link sets.
pub const COOKIE: &str = "edgemux_link";
/// The query parameter a link carries its token in.
pub const QUERY: &str = "edgemux_link";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("expired token")]
    Expired,
    #[error("token not signed by this gateway for this host")]
    Forged,
}

/// The gateway's token key.
pub struct LinkKey(hmac::Key);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey")
    }
}

impl LinkKey {
    pub fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn message(host: &str, expires: u64) -> Vec<u8> {
        let mut m = b"edgemux link v1\0".to_vec();
        m.extend_from_slice(host.as_bytes());
        m.push(0);
        m.extend_from_slice(expires.to_string().as_bytes());
        m
    }

    /// A token for `host` valid until `expires` (unix seconds).
    pub fn mint(&self, host: &str, expires: u64) -> String {
        let tag = hmac::sign(&self.0, &Self::message(host, expires));
        format!("{expires}.{}", BASE64URL_NOPAD.encode(tag.as_ref()))
    }

    /// Checks `token` for `host` at `now` (unix seconds); the signature in constant time.
    pub fn check(&self, host: &str, token: &str, now: u64) -> Result<(), TokenError> {
        if token.len() > MAX_TOKEN {
            return Err(TokenError::Malformed);
        }
        let (expires, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        if expires.is_empty() || expires.len() > 12 || !expires.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TokenError::Malformed);
        }
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let tag = BASE64URL_NOPAD
            .decode(tag.as_bytes())
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.0, &Self::message(host, expires), &tag).map_err(|_| TokenError::Forged)?;
        if now >= expires {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_its_host_until_it_expires() {
        let key = LinkKey::new(b"0123456789abcdef0123456789abcdef");
        let t = key.mint("app-abcd.gw.test", 1_000);
        assert_eq!(key.check("app-abcd.gw.test", &t, 999), Ok(()));
        assert_eq!(key.check("app-abcd.gw.test", &t, 1_000), Err(TokenError::Expired));
        assert_eq!(key.check("other-abcd.gw.test", &t, 10), Err(TokenError::Forged));
        let other = LinkKey::new(b"another key, another gateway....");
        assert_eq!(other.check("app-abcd.gw.test", &t, 10), Err(TokenError::Forged));
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let key = LinkKey::new(b"k");
        let t = key.mint("h", 5_000);
        let later = t.replacen("5000", "9000", 1);
        assert_eq!(key.check("h", &later, 10), Err(TokenError::Forged));
        for bad in ["", ".", "5000", "5000.", "x.abc", "5000.!!!", &"1".repeat(200)] {
            assert!(key.check("h", bad, 10).is_err(), "{bad:?}");
        }
        for n in 0..t.len() {
            assert!(key.check("h", &t[..n], 10).is_err(), "prefix {n}");
        }
    }
}
