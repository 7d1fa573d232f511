//! The shared vocabulary of names, with no I/O: tunnel names, key ids, tunnel hosts
//! (`<name>-<keyid>.<domain>`) and the origin URLs built from them. Pure functions, fuzzed.
//!
//! The key id in every host is what stops one user from taking over another's hostname.

/// 8 base32 characters = 40 bits of SHA-256: collisions need ~10^12 keys, and a host label
/// `<name>-<keyid>` still leaves 54 characters for the name.
pub const KEY_ID_LEN: usize = 8;

/// A DNS label is at most 63 bytes; the host label is `<name>-<keyid>`.
pub const MAX_NAME: usize = 63 - 1 - KEY_ID_LEN;
/// A DNS name is at most 253 characters in text form.
pub const MAX_DOMAIN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("tunnel name {0:?} is empty")]
    Empty(String),
    #[error("tunnel name {name:?} is longer than {MAX_NAME} characters")]
    TooLong { name: String },
    #[error(
        "tunnel name {0:?} may only hold letters a-z, digits and '-', and may not start or end with '-'"
    )]
    BadCharacters(String),
}

/// A validated, lowercase tunnel name (one DNS label short enough to carry the key id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelName(String);

impl TunnelName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TunnelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates a tunnel name; ASCII case is folded since hostnames are case-insensitive.
pub fn parse_name(raw: &str) -> Result<TunnelName, NameError> {
    let shown: String = raw.chars().take(80).collect();
    if raw.is_empty() {
        return Err(NameError::Empty(shown));
    }
    if raw.len() > MAX_NAME {
        return Err(NameError::TooLong { name: shown });
    }
    if !is_label(raw) {
        return Err(NameError::BadCharacters(shown));
    }
    Ok(TunnelName(raw.to_ascii_lowercase()))
}

fn is_label(s: &str) -> bool {
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || b == b'-';
    !s.is_empty() && s.len() <= 63 && s.bytes().all(ok_char) && !s.starts_with('-') && !s.ends_with('-')
}

/// The name a `tcpip-forward` bind address asks for: `-R myapp:80:…` binds "myapp"; an empty bind,
/// `localhost` (OpenSSH's default) or a wildcard means "use my SSH user name".
pub fn name_for_bind(bind_address: &str, user: &str) -> Result<TunnelName, NameError> {
    match bind_address {
        "" | "localhost" | "*" | "0.0.0.0" | "::" | "127.0.0.1" | "::1" => parse_name(user),
        other => parse_name(other),
    }
}

/// `myapp-abcdefgh.gw.example.com`.
pub fn host_for(name: &TunnelName, keyid: &str, domain: &str) -> String {
    format!("{}.{domain}", short_host(name, keyid))
}

/// `myapp-abcdefgh`, the host's first label.
pub fn short_host(name: &TunnelName, keyid: &str) -> String {
    format!("{name}-{keyid}")
}

/// An SSH key's identity: the SHA-256 digest of the public key, shown as OpenSSH shows it
/// (`SHA256:` and unpadded base64, what `ssh-keygen -lf KEY.pub` prints). Authorization, grants,
/// reservations, pools and key-id ownership compare this, never the short key id: 40 bits can be
/// collided with rented hardware, 256 cannot.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyFingerprint([u8; 32]);

impl KeyFingerprint {
    pub const fn from_sha256(digest: [u8; 32]) -> Self {
        Self(digest)
    }

    /// The digest itself, as it travels in binary protocols (the cluster's peer header).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses `SHA256:<43 base64 characters>`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let b64 = text.trim().strip_prefix("SHA256:")?;
        let bytes = data_encoding::BASE64_NOPAD.decode(b64.as_bytes()).ok()?;
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// The short id in host names: the first [`KEY_ID_LEN`] characters of the lowercase base32 of
    /// the digest (DNS-safe).
    pub fn key_id(&self) -> String {
        let mut id = data_encoding::BASE32_NOPAD.encode(&self.0).to_ascii_lowercase();
        id.truncate(KEY_ID_LEN);
        id
    }

    /// Another key with the same short id (the first 5 digest bytes) but not the same
    /// fingerprint: what an attacker has after about 2^40 hashes.
    #[cfg(test)]
    pub(crate) fn colliding(&self) -> Self {
        let mut other = self.0;
        other[31] ^= 0xff;
        Self(other)
    }
}

impl std::fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SHA256:{}", data_encoding::BASE64_NOPAD.encode(&self.0))
    }
}

impl std::fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for KeyFingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Whether `s` has the form of a key id: [`KEY_ID_LEN`] characters of lowercase base32.
pub fn is_key_id(s: &str) -> bool {
    s.len() == KEY_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

/// `https://host`, with `:port` unless it is 443: the public form of a host's URL.
pub fn https_origin(host: &str, port: u16) -> String {
    match port {
        443 => format!("https://{host}"),
        p => format!("https://{host}:{p}"),
    }
}

/// Whether `domain` is a DNS name made of valid labels.
pub fn is_domain(domain: &str) -> bool {
    !domain.is_empty() && domain.len() <= MAX_DOMAIN && domain.split('.').all(is_label)
}

/// Resolves a host that a client names (Host header, `ssh -L` target) to a full tunnel host under
/// `domain`: accepts `name-keyid.domain` and the short `name-keyid`, with any ASCII case and an
/// optional trailing dot. Returns `None` for anything that cannot be a tunnel host.
pub fn canonical_host(host: &str, domain: &str) -> Option<String> {
    if host.len() > MAX_DOMAIN {
        return None;
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label = match host.strip_suffix(domain) {
        Some(rest) => rest.strip_suffix('.')?,
        None => host.as_str(),
    };
    if !is_label(label) {
        return None;
    }
    Some(format!("{label}.{domain}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("MyApp").unwrap().as_str(), "myapp");
        assert_eq!(parse_name("a-1").unwrap().as_str(), "a-1");
        assert!(matches!(parse_name(""), Err(NameError::Empty(_))));
        assert!(matches!(parse_name("-a"), Err(NameError::BadCharacters(_))));
        assert!(matches!(parse_name("a-"), Err(NameError::BadCharacters(_))));
        assert!(matches!(
            parse_name("bad_name!"),
            Err(NameError::BadCharacters(_))
        ));
        assert!(matches!(parse_name("a.b"), Err(NameError::BadCharacters(_))));
        assert!(matches!(parse_name("é"), Err(NameError::BadCharacters(_))));
        assert!(parse_name(&"a".repeat(MAX_NAME)).is_ok());
        assert!(matches!(
            parse_name(&"a".repeat(MAX_NAME + 1)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn host_label_fits_dns() {
        let name = parse_name(&"a".repeat(MAX_NAME)).unwrap();
        assert_eq!(short_host(&name, "abcdefgh").len(), 63);
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(name_for_bind("localhost", "Alice").unwrap().as_str(), "alice");
        assert_eq!(name_for_bind("", "bob").unwrap().as_str(), "bob");
        assert_eq!(name_for_bind("web", "bob").unwrap().as_str(), "web");
        assert!(name_for_bind("localhost", "bob@corp").is_err());
    }

    #[test]
    fn canonical_hosts() {
        let d = "gw.test";
        assert_eq!(
            canonical_host("App-AbCd.GW.test.", d).unwrap(),
            "app-abcd.gw.test"
        );
        assert_eq!(canonical_host("app-abcd", d).unwrap(), "app-abcd.gw.test");
        assert_eq!(canonical_host("127.0.0.1", d), None);
        assert_eq!(canonical_host("a.b.gw.test", d), None);
        assert_eq!(canonical_host("gw.test", d), None);
        assert_eq!(canonical_host("", d), None);
        assert_eq!(canonical_host("xgw.test", d), None);
    }

    #[test]
    fn fingerprints_round_trip_and_give_the_key_id() {
        let fp = KeyFingerprint::from_sha256([7u8; 32]);
        let text = fp.to_string();
        assert!(text.starts_with("SHA256:") && text.len() == 7 + 43, "{text}");
        assert_eq!(KeyFingerprint::parse(&text), Some(fp));
        assert!(is_key_id(&fp.key_id()));
        assert_eq!(KeyFingerprint::parse("SHA256:short"), None);
        assert_eq!(
            KeyFingerprint::parse("abcd2345"),
            None,
            "a key id is not a fingerprint"
        );
        assert_eq!(KeyFingerprint::parse(&text.replace("SHA256:", "MD5:")), None);
        assert_eq!(fp.colliding().key_id(), fp.key_id());
        assert_ne!(fp.colliding(), fp);
    }

    #[test]
    fn key_ids_and_origins() {
        assert!(is_key_id("abcd2345"));
        assert!(!is_key_id("abcd1234"), "1 is not base32");
        assert!(!is_key_id("ABCD2345"));
        assert!(!is_key_id("abcd234"));
        assert_eq!(https_origin("a.gw.test", 443), "https://a.gw.test");
        assert_eq!(https_origin("a.gw.test", 8443), "https://a.gw.test:8443");
    }

    #[test]
    fn domains() {
        assert!(is_domain("gw.example.com"));
        assert!(is_domain("localhost"));
        assert!(!is_domain("not a domain"));
        assert!(!is_domain("a..b"));
        assert!(!is_domain(""));
    }
}
