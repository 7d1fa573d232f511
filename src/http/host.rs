//! The request's host: HTTP/1.1 `Host` or h2 `:authority`, port stripped, lowercased, bounded.
//! Pure and fuzzed.

/// RFC 1035's limit on a DNS name in text form.
pub const MAX_HOST: usize = crate::names::MAX_DOMAIN;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("no Host header")]
    Missing,
    #[error("Host header longer than {MAX_HOST} bytes")]
    TooLong,
    #[error("Host header is not a host name")]
    Invalid,
}

/// Parses a `Host` / `:authority` value into a lowercase host name without port or trailing dot.
/// IP literals are accepted as hosts (they route nowhere but deserve a 404, not a 400).
pub fn parse_host(raw: &[u8]) -> Result<String, HostError> {
    if raw.is_empty() {
        return Err(HostError::Missing);
    }
    if raw.len() > MAX_HOST + 7 {
        return Err(HostError::TooLong);
    }
    let text = std::str::from_utf8(raw).map_err(|_| HostError::Invalid)?;
    let host = strip_port(text).ok_or(HostError::Invalid)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    // Empty labels ("a..b", "a..") name nothing; one trailing dot (the root) is allowed above.
    if host.is_empty() || host.starts_with('.') || host.ends_with('.') || host.contains("..") {
        return Err(HostError::Invalid);
    }
    if host.len() > MAX_HOST {
        return Err(HostError::TooLong);
    }
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']');
    if !host.bytes().all(ok) {
        return Err(HostError::Invalid);
    }
    Ok(host.to_ascii_lowercase())
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`. `None` when the port part is not a number.
fn strip_port(s: &str) -> Option<&str> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let (host, rest) = s.split_at(end + 1);
        return match rest {
            "" => Some(host),
            _ => rest.strip_prefix(':').filter(|p| is_port(p)).map(|_| host),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) if is_port(port) && !host.contains(':') => Some(host),
        Some(_) => None,
        None => Some(s),
    }
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(parse_host(b"App-X.GW.test:8443").unwrap(), "app-x.gw.test");
        assert_eq!(parse_host(b"gw.test.").unwrap(), "gw.test");
        assert_eq!(parse_host(b"127.0.0.1:80").unwrap(), "127.0.0.1");
        assert_eq!(parse_host(b"[::1]:443").unwrap(), "[::1]");
        assert_eq!(parse_host(b""), Err(HostError::Missing));
        assert_eq!(parse_host(b"a b"), Err(HostError::Invalid));
        assert_eq!(parse_host(b"a:b"), Err(HostError::Invalid));
        assert_eq!(parse_host(b"a:1:2"), Err(HostError::Invalid));
        assert_eq!(parse_host(b":80"), Err(HostError::Invalid));
        assert_eq!(parse_host(b"[::1"), Err(HostError::Invalid));
        assert_eq!(parse_host(b"\xff"), Err(HostError::Invalid));
        // Found by the `host` fuzz target: a second trailing dot made parsing non-idempotent.
        assert_eq!(parse_host(b"TtWsGe.."), Err(HostError::Invalid));
        assert_eq!(parse_host(b"a..b"), Err(HostError::Invalid));
        assert_eq!(parse_host("a".repeat(300).as_bytes()), Err(HostError::TooLong));
    }

    #[test]
    fn every_prefix_of_an_authority_parses_to_a_port_free_stable_host() {
        let sample = b"MyApp-abcdefgh.gw.example.com:443";
        for n in 0..=sample.len() {
            if let Ok(h) = parse_host(&sample[..n]) {
                assert!(!h.contains(':'), "{h}");
                assert_eq!(parse_host(h.as_bytes()).as_deref(), Ok(h.as_str()));
            }
        }
        assert_eq!(parse_host(sample).unwrap(), "myapp-abcdefgh.gw.example.com");
        assert_eq!(
            parse_host(&sample[..sample.len() - 1]).unwrap(),
            "myapp-abcdefgh.gw.example.com"
        );
        assert_eq!(
            parse_host(&sample[..sample.len() - 3]),
            Err(HostError::Invalid),
            "a bare colon"
        );
    }
}
