//! PROXY protocol v1/v2 (HAProxy, AWS NLB): the real client address, accepted only from trusted
//! load balancers.
//!
//! [`parse_header`] is pure (found / not a header / need more / invalid) over bytes, using `ppp`
//! for the grammar; [`read_header`] does the bounded, timed reading and returns every byte past
//! the header for the next stage.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v1 spec's limit: "PROXY TCP6 <39> <39> <5> <5>\r\n" is at most 107 bytes.
pub const MAX_V1: usize = 107;
/// 16 fixed bytes plus a 16-bit length of addresses and TLVs.
pub const MAX_V2: usize = 16 + 65_535;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// TLV types (PROXY protocol spec §2.2; AWS docs for 0xEA).
const TLV_CRC32C: u8 = 0x03;
const TLV_AWS: u8 = 0xEA;
const AWS_VPCE_ID: u8 = 0x01;

/// What a header told us.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyHeader {
    pub version: u8,
    /// The client's address; `None` for v2 LOCAL (health checks) and UNSPEC/UNKNOWN families,
    /// where the peer's own address stands.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// AWS VPC endpoint id (TLV 0xEA, subtype 0x01), when the NLB sends one.
    pub vpce_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// The bytes do not start with a PROXY header.
    NotProxy,
    Incomplete,
    Invalid(&'static str),
    Complete {
        header: ProxyHeader,
        consumed: usize,
    },
}

/// Parses a PROXY header at the start of `buf`.
pub fn parse_header(buf: &[u8]) -> Parse {
    if starts_like(buf, V2_SIGNATURE) {
        return parse_v2(buf);
    }
    if starts_like(buf, V1_PREFIX) {
        return parse_v1(buf);
    }
    Parse::NotProxy
}

/// `buf` is a prefix of `sig` or starts with it.
fn starts_like(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf[..n] == sig[..n]
}

fn parse_v1(buf: &[u8]) -> Parse {
    // ppp calls a v1 header cut before its end invalid, so find the CRLF first.
    let window = &buf[..buf.len().min(MAX_V1)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Parse::Invalid("v1 header longer than 107 bytes")
        } else {
            Parse::Incomplete
        };
    };
    let line = &buf[..end + 2];
    let Ok(header) = ppp::v1::Header::try_from(line) else {
        return Parse::Invalid("malformed v1 header");
    };
    let (source, destination) = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => pair_v4(&a),
        ppp::v1::Addresses::Tcp6(a) => pair_v6(&a),
        ppp::v1::Addresses::Unknown => (None, None),
    };
    Parse::Complete {
        header: ProxyHeader {
            version: 1,
            source,
            destination,
            vpce_id: None,
        },
        consumed: line.len(),
    }
}

fn parse_v2(buf: &[u8]) -> Parse {
    if buf.len() < 16 {
        return Parse::Incomplete;
    }
    let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < total {
        return Parse::Incomplete;
    }
    let bytes = &buf[..total];
    let header = match ppp::v2::Header::try_from(bytes) {
        Ok(h) => h,
        Err(_) => return Parse::Invalid("malformed v2 header"),
    };
    let mut out = ProxyHeader {
        version: 2,
        ..Default::default()
    };
    for tlv in header.tlvs() {
        let Ok(tlv) = tlv else {
            return Parse::Invalid("malformed v2 TLV");
        };
        match tlv.kind {
            TLV_CRC32C if !crc_matches(bytes, &tlv.value) => return Parse::Invalid("v2 CRC32C mismatch"),
            TLV_AWS if tlv.value.first() == Some(&AWS_VPCE_ID) => {
                out.vpce_id = Some(String::from_utf8_lossy(&tlv.value[1..]).into_owned());
            }
            _ => {}
        }
    }
    if header.command == ppp::v2::Command::Proxy {
        (out.source, out.destination) = match header.addresses {
            ppp::v2::Addresses::IPv4(a) => pair_v4(&a),
            ppp::v2::Addresses::IPv6(a) => pair_v6(&a),
            ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => (None, None),
        };
    }
    Parse::Complete {
        header: out,
        consumed: total,
    }
}

/// Source and destination, as both header versions carry them.
type Pair = (Option<SocketAddr>, Option<SocketAddr>);

fn pair_v4(a: &ppp::v2::IPv4) -> Pair {
    (
        Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Some(SocketAddr::new(a.destination_address.into(), a.destination_port)),
    )
}

fn pair_v6(a: &ppp::v2::IPv6) -> Pair {
    (
        Some(canonical(SocketAddr::new(a.source_address.into(), a.source_port))),
        Some(canonical(SocketAddr::new(
            a.destination_address.into(),
            a.destination_port,
        ))),
    )
}

/// IPv4-mapped IPv6 addresses are shown as the IPv4 address they are.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The CRC32C TLV holds the checksum of the whole header computed with the TLV's value zeroed.
fn crc_matches(header: &[u8], value: &[u8]) -> bool {
    let Ok(expected) = <[u8; 4]>::try_from(value) else {
        return false;
    };
    // Locate the value inside the header to zero it: it is the only 4-byte TLV of type 0x03.
    let Some(pos) = find_tlv_value(header, TLV_CRC32C) else {
        return false;
    };
    let mut copy = header.to_vec();
    let Some(value) = copy.get_mut(pos..pos + 4) else {
        return false;
    };
    value.fill(0);
    crc32c(&copy) == u32::from_be_bytes(expected)
}

/// Offset of the value of the first TLV of `kind` after the address block.
fn find_tlv_value(header: &[u8], kind: u8) -> Option<usize> {
    let family = header.get(13)? >> 4;
    let addr_len = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    let mut at = 16 + addr_len;
    while at + 3 <= header.len() {
        let len = usize::from(u16::from_be_bytes([header[at + 1], header[at + 2]]));
        if header[at] == kind {
            return (at + 3 + len <= header.len()).then_some(at + 3);
        }
        at += 3 + len;
    }
    None
}

/// CRC-32C (Castagnoli), bitwise: headers are small and rare, a table is not worth it.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("PROXY header from untrusted peer {0}: refused, it could forge client addresses")]
    Untrusted(IpAddr),
    #[error("no PROXY header from trusted peer {0} on a listener that requires one")]
    Missing(IpAddr),
    #[error("invalid PROXY header: {0}")]
    Invalid(&'static str),
    #[error("PROXY header incomplete when the peer stopped sending")]
    Truncated,
    #[error("i/o error while reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Untrusted(_) => "untrusted",
            Self::Missing(_) => "missing",
            Self::Invalid(_) => "invalid",
            Self::Truncated => "truncated",
            Self::Io(_) => "io",
        }
    }
}

/// What reading the start of a connection found.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderRead {
    Header(ProxyHeader),
    /// The first bytes are something else, or the peer stayed silent.
    NoHeader,
    /// The peer closed without sending a byte (a TCP health check).
    Closed,
}

/// Reads a PROXY header if one is there. Returns what it found and the bytes read past it.
/// The caller's deadline bounds the time; the size is bounded by [`MAX_V2`].
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    silence: Duration,
) -> (Result<HeaderRead, ProxyError>, Vec<u8>) {
    let mut buf = Vec::with_capacity(256);
    loop {
        match parse_header(&buf) {
            Parse::NotProxy => return (Ok(HeaderRead::NoHeader), buf),
            Parse::Complete { header, consumed } => {
                let rest = buf.split_off(consumed);
                return (Ok(HeaderRead::Header(header)), rest);
            }
            Parse::Invalid(why) => return (Err(ProxyError::Invalid(why)), buf),
            Parse::Incomplete => {}
        }
        let want = if buf.len() < 16 {
            16 - buf.len()
        } else {
            MAX_V2 - buf.len()
        };
        let mut chunk = vec![0u8; want.min(4096)];
        // Silence before any byte: not a PROXY client (an SSH client waiting for our banner).
        let read = if buf.is_empty() {
            match tokio::time::timeout(silence, stream.read(&mut chunk)).await {
                Ok(r) => r,
                Err(_) => return (Ok(HeaderRead::NoHeader), buf),
            }
        } else {
            stream.read(&mut chunk).await
        };
        match read {
            Ok(0) if buf.is_empty() => return (Ok(HeaderRead::Closed), buf),
            Ok(0) => return (Err(ProxyError::Truncated), buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return (Err(e.into()), buf),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// What HAProxy's `send-proxy` writes.
    const V1: &[u8] = b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 443\r\nSSH-2.0-x\r\n";

    /// An NLB-style v2 header: PROXY, TCP4, with an AWS VPC endpoint TLV and a CRC32C TLV.
    fn nlb_v2(payload: &[u8]) -> Vec<u8> {
        let vpce = b"\x01vpce-0123456789abcdef0";
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        let len = 12 + 3 + vpce.len() + 3 + 4;
        h.extend_from_slice(&(len as u16).to_be_bytes());
        h.extend_from_slice(&[198, 51, 100, 7, 10, 0, 0, 1]);
        h.extend_from_slice(&51234u16.to_be_bytes());
        h.extend_from_slice(&443u16.to_be_bytes());
        h.push(TLV_AWS);
        h.extend_from_slice(&(vpce.len() as u16).to_be_bytes());
        h.extend_from_slice(vpce);
        h.extend_from_slice(&[TLV_CRC32C, 0, 4, 0, 0, 0, 0]);
        let crc = crc32c(&h);
        let at = h.len() - 4;
        h[at..].copy_from_slice(&crc.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    fn every_prefix(sample: &[u8], want: &ProxyHeader, header_len: usize) {
        for n in 0..sample.len() {
            match parse_header(&sample[..n]) {
                Parse::Incomplete => assert!(n < header_len, "incomplete at {n}"),
                Parse::Complete { header, consumed } => {
                    assert!(n >= header_len);
                    assert_eq!(&header, want);
                    assert_eq!(consumed, header_len);
                }
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn v1_every_prefix() {
        let want = ProxyHeader {
            version: 1,
            source: Some("127.0.0.5:40000".parse().unwrap()),
            destination: Some("127.0.0.1:443".parse().unwrap()),
            vpce_id: None,
        };
        every_prefix(V1, &want, V1.len() - b"SSH-2.0-x\r\n".len());
    }

    #[test]
    fn v2_nlb_every_prefix() {
        let sample = nlb_v2(b"\x16\x03\x01");
        let want = ProxyHeader {
            version: 2,
            source: Some("198.51.100.7:51234".parse().unwrap()),
            destination: Some("10.0.0.1:443".parse().unwrap()),
            vpce_id: Some("vpce-0123456789abcdef0".into()),
        };
        every_prefix(&sample, &want, sample.len() - 3);
    }

    #[test]
    fn v2_bad_crc_is_refused() {
        let mut sample = nlb_v2(b"");
        let last = sample.len() - 1;
        sample[last] ^= 1;
        assert_eq!(parse_header(&sample), Parse::Invalid("v2 CRC32C mismatch"));
    }

    #[test]
    fn v2_local_and_v6() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        match parse_header(&local) {
            Parse::Complete { header, consumed: 16 } => assert_eq!(header.source, None),
            other => panic!("{other:?}"),
        }
        let v6 = b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1000 443\r\n";
        match parse_header(v6) {
            Parse::Complete { header, .. } => {
                assert_eq!(header.source, Some("192.0.2.1:1000".parse().unwrap()));
                assert_eq!(header.destination, Some("[2001:db8::1]:443".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn not_proxy_and_garbage() {
        assert_eq!(parse_header(b"\x16\x03\x01"), Parse::NotProxy);
        assert_eq!(parse_header(b"SSH-2.0"), Parse::NotProxy);
        assert_eq!(parse_header(b"PROXY"), Parse::Incomplete);
        assert_eq!(
            parse_header(b"PROXY TCP4 nonsense\r\n"),
            Parse::Invalid("malformed v1 header")
        );
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(
            parse_header(&long),
            Parse::Invalid("v1 header longer than 107 bytes")
        );
    }

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[tokio::test]
    async fn one_byte_at_a_time_keeps_the_payload() {
        let sample = nlb_v2(b"hello");
        let (mut client, mut server) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in sample {
                client.write_all(&[b]).await.unwrap();
            }
            client
        });
        let (res, rest) = read_header(&mut server, Duration::from_secs(5)).await;
        let HeaderRead::Header(h) = res.unwrap() else {
            panic!("no header")
        };
        assert_eq!(h.source, Some("198.51.100.7:51234".parse().unwrap()));
        let mut all = rest;
        let _client = writer.await.unwrap();
        let mut more = vec![0u8; 16];
        while all.len() < 5 {
            let n = server.read(&mut more).await.unwrap();
            all.extend_from_slice(&more[..n]);
        }
        assert_eq!(all, b"hello");
    }
}
