//! Protocol sniffing on the first bytes of a stream (plaintext, or decrypted after TLS).
//!
//! [`parse_protocol`] is pure and answers found / not this / need more; [`read_protocol`] does the
//! bounded, timed reading and hands back every byte it read so the next stage can replay it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest signature we match is the HTTP/2 preface start `PRI * HTTP/2.0` (14 bytes); no
/// decision ever needs more than this many bytes.
pub const MAX_SNIFF: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Ssh,
    Http,
    /// A PROXY protocol header on a listener that does not expect one: a misconfiguration.
    ProxyHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    Incomplete,
    Invalid,
    Found(Protocol),
}

const HTTP_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PRI * HTTP/2.0",
];

const SIGNATURES: &[(&[u8], Protocol)] = &[
    (b"SSH-", Protocol::Ssh),
    (b"PROXY ", Protocol::ProxyHeader),
    (b"\r\n\r\n\0\r\nQUIT\n", Protocol::ProxyHeader),
];

/// Decides which protocol `buf` starts with.
pub fn parse_protocol(buf: &[u8]) -> Sniff {
    match buf {
        [] => return Sniff::Incomplete,
        // A TLS handshake record: content type 22, record version major 3.
        [0x16] => return Sniff::Incomplete,
        [0x16, 0x03, ..] => return Sniff::Found(Protocol::Tls),
        _ => {}
    }
    let candidates = SIGNATURES
        .iter()
        .copied()
        .chain(HTTP_METHODS.iter().map(|m| (*m, Protocol::Http)));
    let mut incomplete = false;
    for (sig, proto) in candidates {
        if buf.starts_with(sig) {
            return Sniff::Found(proto);
        }
        incomplete |= sig.starts_with(buf);
    }
    if incomplete {
        Sniff::Incomplete
    } else {
        Sniff::Invalid
    }
}

/// What a bounded read of the first bytes found.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    Found(Protocol),
    /// The peer sent nothing within the timeout (an SSH client waiting for our banner).
    Silent,
    /// The peer closed without sending a byte (a TCP health check).
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    #[error("unrecognised protocol")]
    Unknown,
    #[error("incomplete protocol signature when the peer stopped sending")]
    Truncated,
    #[error("i/o error while sniffing: {0}")]
    Io(#[from] std::io::Error),
}

impl SniffError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown_protocol",
            Self::Truncated => "truncated",
            Self::Io(_) => "io",
        }
    }
}

/// Reads until the protocol is known, the peer is silent for `timeout`, or it closes.
/// Returns every byte read, to be replayed.
pub async fn read_protocol<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> (Result<Sniffed, SniffError>, Vec<u8>) {
    let mut buf = Vec::with_capacity(MAX_SNIFF);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match parse_protocol(&buf) {
            Sniff::Found(p) => return (Ok(Sniffed::Found(p)), buf),
            Sniff::Invalid => return (Err(SniffError::Unknown), buf),
            Sniff::Incomplete => {}
        }
        let mut chunk = [0u8; MAX_SNIFF];
        let want = MAX_SNIFF - buf.len();
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await;
        match read {
            Err(_elapsed) if buf.is_empty() => return (Ok(Sniffed::Silent), buf),
            Err(_elapsed) => return (Err(SniffError::Truncated), buf),
            Ok(Ok(0)) if buf.is_empty() => return (Ok(Sniffed::Closed), buf),
            Ok(Ok(0)) => return (Err(SniffError::Truncated), buf),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return (Err(e.into()), buf),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// First bytes of real captures: curl's ClientHello, OpenSSH's banner, an HTTP request, an h2
    /// preface, HAProxy's v1 and v2 headers.
    const SAMPLES: &[(&[u8], Protocol)] = &[
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", Protocol::Tls),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", Protocol::Ssh),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Protocol::Http),
        (b"POST /x HTTP/1.1\r\n", Protocol::Http),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Protocol::Http),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Protocol::ProxyHeader),
        (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c", Protocol::ProxyHeader),
    ];

    #[test]
    fn every_prefix_is_incomplete_until_found() {
        for (sample, proto) in SAMPLES {
            let mut found_at = None;
            for n in 0..=sample.len() {
                match parse_protocol(&sample[..n]) {
                    Sniff::Incomplete => assert!(found_at.is_none()),
                    Sniff::Found(p) => {
                        assert_eq!(p, *proto, "sample {sample:?}");
                        found_at.get_or_insert(n);
                    }
                    Sniff::Invalid => panic!("prefix {:?} judged invalid", &sample[..n]),
                }
            }
            assert!(found_at.unwrap() <= MAX_SNIFF);
        }
    }

    #[test]
    fn garbage_is_invalid() {
        assert_eq!(parse_protocol(b"\x00\x01"), Sniff::Invalid);
        assert_eq!(parse_protocol(b"\x16\x02"), Sniff::Invalid);
        assert_eq!(parse_protocol(b"GETX"), Sniff::Invalid);
        assert_eq!(parse_protocol(b"ssh-"), Sniff::Invalid);
    }

    #[tokio::test]
    async fn split_reads_keep_every_byte() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in b"SSH-2.0-x\r\n" {
                client.write_all(&[*b]).await.unwrap();
            }
            client
        });
        let (res, buf) = read_protocol(&mut server, Duration::from_secs(5)).await;
        assert_eq!(res.unwrap(), Sniffed::Found(Protocol::Ssh));
        assert!(b"SSH-2.0-x\r\n".starts_with(&buf));
        drop(writer.await);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_and_close() {
        let (_client, mut server) = tokio::io::duplex(64);
        let (res, _) = read_protocol(&mut server, Duration::from_secs(1)).await;
        assert_eq!(res.unwrap(), Sniffed::Silent);
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let (res, _) = read_protocol(&mut server, Duration::from_secs(1)).await;
        assert_eq!(res.unwrap(), Sniffed::Closed);
    }
}
