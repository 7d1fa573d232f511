//! Where a connection goes once TLS (if any) is done: by ALPN, else by the first decrypted bytes.
//! Pure decisions; the reading lives in `sniff`.

use crate::sniff::{Protocol, Sniffed};
use crate::tls::{ALPN_H2, ALPN_HTTP1, ALPN_SSH};

/// The service a connection goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    Ssh,
    Http(Wire),
    /// TLS not terminated: its bytes go to a `tls=passthrough` tunnel as they are.
    Passthrough,
}

impl Dest {
    /// A bounded metric label and the connection span's `route`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ssh => "ssh",
            Self::Http(_) => "http",
            Self::Passthrough => "passthrough",
        }
    }
}

/// Which HTTP the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// ALPN said `http/1.1`.
    Http1,
    /// ALPN said `h2`.
    H2,
    /// No ALPN (plain HTTP, or TLS without ALPN): served as HTTP/1.1; h2 is only for clients
    /// that ask for it with ALPN.
    Detect,
}

/// The route an ALPN protocol names, or `None` when the bytes must decide.
pub(crate) fn by_alpn(alpn: Option<&[u8]>) -> Option<Dest> {
    match alpn? {
        ALPN_SSH => Some(Dest::Ssh),
        ALPN_H2 => Some(Dest::Http(Wire::H2)),
        ALPN_HTTP1 => Some(Dest::Http(Wire::Http1)),
        _ => None,
    }
}

/// Why a connection gets no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoRoute {
    /// Closed before sending anything: a health check, closed quietly.
    Closed,
    /// A protocol we recognise but do not serve at this point (nested TLS, a stray PROXY header).
    Unexpected(Protocol),
    /// Plain SSH on a listener that does not allow it.
    PlainSshDisabled,
}

/// The route for what the first bytes showed. Silence means an SSH client waiting for our banner.
pub(crate) fn by_sniff(sniffed: &Sniffed, ssh_allowed: bool) -> Result<Dest, NoRoute> {
    match sniffed {
        Sniffed::Found(Protocol::Http) => Ok(Dest::Http(Wire::Detect)),
        Sniffed::Found(Protocol::Ssh) | Sniffed::Silent if ssh_allowed => Ok(Dest::Ssh),
        Sniffed::Found(Protocol::Ssh) | Sniffed::Silent => Err(NoRoute::PlainSshDisabled),
        Sniffed::Found(p) => Err(NoRoute::Unexpected(*p)),
        Sniffed::Closed => Err(NoRoute::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_routes() {
        assert_eq!(by_alpn(Some(b"ssh")), Some(Dest::Ssh));
        assert_eq!(by_alpn(Some(b"h2")), Some(Dest::Http(Wire::H2)));
        assert_eq!(by_alpn(Some(b"http/1.1")), Some(Dest::Http(Wire::Http1)));
        assert_eq!(by_alpn(Some(b"spdy/3")), None);
        assert_eq!(by_alpn(None), None);
    }

    #[test]
    fn sniff_routes() {
        assert_eq!(by_sniff(&Sniffed::Silent, true), Ok(Dest::Ssh));
        assert_eq!(by_sniff(&Sniffed::Silent, false), Err(NoRoute::PlainSshDisabled));
        assert_eq!(
            by_sniff(&Sniffed::Found(Protocol::Http), false),
            Ok(Dest::Http(Wire::Detect))
        );
        assert_eq!(by_sniff(&Sniffed::Found(Protocol::Ssh), true), Ok(Dest::Ssh));
        assert_eq!(by_sniff(&Sniffed::Closed, true), Err(NoRoute::Closed));
        assert_eq!(
            by_sniff(&Sniffed::Found(Protocol::Tls), true),
            Err(NoRoute::Unexpected(Protocol::Tls))
        );
    }
}
