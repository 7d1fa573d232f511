//! The peer protocol v1 on the wire (ALPN `edgemux-peer/1`), pure: no I/O, no clock.
//!
//! The dialing replica sends one PROXY v2 header and waits; the owner answers one status, then
//! (on OK) raw bytes flow both ways. The header, in this exact order and nothing else:
//!
//! ```text
//! 0   12  signature \r\n\r\n\0\r\nQUIT\n
//! 12   1  0x21       version 2, command PROXY
//! 13   1  0x11|0x21  TCP over IPv4 | IPv6 (IPv6 as soon as one address is IPv6)
//! 14   2  length of what follows (big endian, as every length below)
//! 16 12|36 source = the visitor, destination = the address it reached
//!     TLV 0x02 AUTHORITY  the target host (a DNS name, ≤ 253 bytes)
//!     TLV 0xEA AWS        optional: 0x01 + the VPC endpoint id the visitor came through
//!     TLV 0xE7 EDGEMUX    sub-TLVs (type u8, length u16, value):
//!         0x01 op u8      1 dial-http, 2 dial-tcp, 3 lookup, 5 kill, 6 ping (4 list: reserved)
//!         0x02 port u16
//!         0x03 on-behalf key: the 32-byte SHA-256 key fingerprint (optional)
//!         0x04 sender replica id (1..=128 bytes, a DNS name)
//!         0x05 timestamp, ms since the Unix epoch, u64
//!         0x06 nonce, 16 bytes
//!         0x7F HMAC-SHA256 of the whole header with this value zeroed (the PP2 CRC32C rule)
//! ```
//!
//! (0x07, a request id for tracing, is kept free for a later version.) The grammar is strict:
//! a header that is not byte for byte what [`encode_request`] writes is refused, so a parsed
//! request re-encodes to the same bytes. The HMAC is the last 32 bytes; it is checked before any
//! field is read. A later protocol version gets a new ALPN, not optional fields.
//!
//! The owner's answer is in [`super::status`].

use std::net::{IpAddr, SocketAddr};

use aws_lc_rs::{constant_time, hmac};

use crate::names::KeyFingerprint;

/// The largest header accepted (SCALEOUT §4.2: "≤ 1 KiB"); the largest this version writes is
/// 619 bytes (a TCP6 header with every field at its maximum).
pub(crate) const MAX_PEER_HEADER: usize = 1024;
/// The longest target host: a DNS name.
pub(crate) const MAX_HOST: usize = crate::names::MAX_DOMAIN;
/// The longest VPC endpoint id copied through; AWS ids are `vpce-` and 17 hex digits.
pub(crate) const MAX_VPCE: usize = 64;
/// The longest replica id: a DNS label (the replica name), a dot and an incarnation, with room
/// left in a 253-byte DNS name for the certificate's `.peer.edgemux.invalid`.
pub(crate) const MAX_REPLICA_ID: usize = 128;
pub(crate) const NONCE_LEN: usize = 16;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const FIXED: usize = 16;
const V2_PROXY: u8 = 0x21;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
const TLV_AUTHORITY: u8 = 0x02;
const TLV_AWS: u8 = 0xEA;
const AWS_VPCE_ID: u8 = 0x01;
const TLV_EDGEMUX: u8 = 0xE7;
const SUB_OP: u8 = 0x01;
const SUB_PORT: u8 = 0x02;
const SUB_ON_BEHALF: u8 = 0x03;
const SUB_SENDER: u8 = 0x04;
const SUB_TIMESTAMP: u8 = 0x05;
const SUB_NONCE: u8 = 0x06;
const SUB_HMAC: u8 = 0x7F;
const HMAC_LEN: usize = 32;
/// The HMAC sub-TLV's type and length, right before its value at the very end.
const HMAC_TLV_HEAD: [u8; 3] = [SUB_HMAC, 0, HMAC_LEN as u8];

/// What a pure parser says about the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parse<T> {
    Incomplete,
    Invalid(CodecError),
    Complete { value: T, consumed: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CodecError {
    #[error("malformed: {0}")]
    Framing(&'static str),
    #[error("longer than allowed")]
    TooLong,
    #[error("HMAC mismatch")]
    Hmac,
    #[error("bad field: {0}")]
    Field(&'static str),
}

impl CodecError {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Framing(_) => "framing",
            Self::TooLong => "too_long",
            Self::Hmac => "hmac",
            Self::Field(_) => "field",
        }
    }
}

/// What the dialing replica asks of the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    DialHttp,
    DialTcp,
    /// Find a host when the store is down.
    Lookup,
    /// Every route the owner holds, when the store is down.
    List,
    /// Close a host's tunnels (admin).
    Kill,
    /// Liveness and the owner's store health (`store=up` | `store=down`), for fencing.
    Ping,
    /// A stream the dialer speaks HTTP/2 on, to an `upstream=h2c` tunnel.
    DialH2c,
    /// A visitor's TLS, ClientHello included, to a `tls=passthrough` tunnel.
    DialTls,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::DialHttp => 1,
            Op::DialTcp => 2,
            Op::Lookup => 3,
            Op::List => 4,
            Op::Kill => 5,
            Op::Ping => 6,
            Op::DialH2c => 7,
            Op::DialTls => 8,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Op::DialHttp,
            2 => Op::DialTcp,
            3 => Op::Lookup,
            4 => Op::List,
            5 => Op::Kill,
            6 => Op::Ping,
            7 => Op::DialH2c,
            8 => Op::DialTls,
            _ => return None,
        })
    }

    /// The ops that open a stream (a kill answers and closes).
    pub(crate) fn is_dial(self) -> bool {
        matches!(self, Op::DialHttp | Op::DialTcp | Op::DialH2c | Op::DialTls)
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Op::DialHttp => "dial_http",
            Op::DialTcp => "dial_tcp",
            Op::Lookup => "lookup",
            Op::List => "list",
            Op::Kill => "kill",
            Op::Ping => "ping",
            Op::DialH2c => "dial_h2c",
            Op::DialTls => "dial_tls",
        }
    }
}

/// One request. Built with [`PeerRequest::dial`], optionally [`with_vpce`](Self::with_vpce) and
/// [`on_behalf_of`](Self::on_behalf_of); the dialer [`stamped`](Self::stamped) it with its replica
/// id, the time and a nonce. Every field is checked where it is set, so what encodes also parses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerRequest {
    op: Op,
    host: String,
    port: u16,
    source: SocketAddr,
    destination: SocketAddr,
    vpce: Option<String>,
    on_behalf: Option<KeyFingerprint>,
    sender: String,
    timestamp_ms: u64,
    nonce: [u8; NONCE_LEN],
}

impl PeerRequest {
    /// A request to open a stream to `host` (its tunnel on `port`) for the visitor at `source`,
    /// who reached `destination`. Not yet stamped.
    pub(crate) fn dial(
        op: Op,
        host: &str,
        port: u16,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<Self, CodecError> {
        if !(host.len() <= MAX_HOST && crate::names::is_domain(host)) {
            return Err(CodecError::Field("host"));
        }
        Ok(Self {
            op,
            host: host.to_owned(),
            port,
            source: canonical(source),
            destination: canonical(destination),
            vpce: None,
            on_behalf: None,
            sender: String::new(),
            timestamp_ms: 0,
            nonce: [0; NONCE_LEN],
        })
    }

    /// The AWS VPC endpoint the visitor came through (from its PROXY header).
    pub(crate) fn with_vpce(mut self, vpce: &str) -> Result<Self, CodecError> {
        if !is_vpce(vpce.as_bytes()) {
            return Err(CodecError::Field("vpce"));
        }
        self.vpce = Some(vpce.to_owned());
        Ok(self)
    }

    /// The key the stream is opened for (`ssh -L`, admin), when it is not the tunnel's own.
    pub(crate) fn on_behalf_of(mut self, key: KeyFingerprint) -> Self {
        self.on_behalf = Some(key);
        self
    }

    /// Signs the request as `sender`'s, made at `timestamp_ms`, with a fresh `nonce`.
    pub(crate) fn stamped(
        mut self,
        sender: &str,
        timestamp_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<Self, CodecError> {
        if !is_replica_id(sender) {
            return Err(CodecError::Field("sender"));
        }
        self.sender = sender.to_owned();
        self.timestamp_ms = timestamp_ms;
        self.nonce = nonce;
        Ok(self)
    }

    pub(crate) fn op(&self) -> Op {
        self.op
    }
    pub(crate) fn host(&self) -> &str {
        &self.host
    }
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
    /// The visitor's real address: the originator of the channel on the owner.
    pub(crate) fn source(&self) -> SocketAddr {
        self.source
    }
    pub(crate) fn destination(&self) -> SocketAddr {
        self.destination
    }
    pub(crate) fn vpce(&self) -> Option<&str> {
        self.vpce.as_deref()
    }
    pub(crate) fn on_behalf(&self) -> Option<KeyFingerprint> {
        self.on_behalf
    }
    pub(crate) fn sender(&self) -> &str {
        &self.sender
    }
    pub(crate) fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
    pub(crate) fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }
}

/// A replica id: a lowercase DNS name of at most [`MAX_REPLICA_ID`] bytes, so that
/// `<rid>.peer.edgemux.invalid` names it in a certificate.
pub(crate) fn is_replica_id(rid: &str) -> bool {
    rid.len() <= MAX_REPLICA_ID
        && crate::names::is_domain(rid)
        && !rid.bytes().any(|b| b.is_ascii_uppercase())
}

fn is_vpce(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_VPCE && id.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
}

/// IPv4-mapped IPv6 addresses are the IPv4 addresses they are.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The HMAC key for [`encode_request`] and [`parse_request`]: the secret's `peer-hmac` key.
pub(crate) fn hmac_key(bytes: &[u8; 32]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, bytes)
}

/// Appends one TLV. Values are bounded where they are set, far below 64 KiB.
fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
}

/// The header for `req`, signed with `key`.
pub(crate) fn encode_request(req: &PeerRequest, key: &hmac::Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(SIGNATURE);
    out.push(V2_PROXY);
    let (src, dst) = (req.source, req.destination);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[TCP4, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.extend_from_slice(&[TCP6, 0, 0]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    tlv(&mut out, TLV_AUTHORITY, req.host.as_bytes());
    if let Some(vpce) = &req.vpce {
        tlv(&mut out, TLV_AWS, &[&[AWS_VPCE_ID], vpce.as_bytes()].concat());
    }
    let mut inner = Vec::with_capacity(128);
    tlv(&mut inner, SUB_OP, &[req.op.code()]);
    tlv(&mut inner, SUB_PORT, &req.port.to_be_bytes());
    if let Some(key) = &req.on_behalf {
        tlv(&mut inner, SUB_ON_BEHALF, key.as_bytes());
    }
    tlv(&mut inner, SUB_SENDER, req.sender.as_bytes());
    tlv(&mut inner, SUB_TIMESTAMP, &req.timestamp_ms.to_be_bytes());
    tlv(&mut inner, SUB_NONCE, &req.nonce);
    tlv(&mut inner, SUB_HMAC, &[0; HMAC_LEN]);
    tlv(&mut out, TLV_EDGEMUX, &inner);
    let len = u16::try_from(out.len() - FIXED).unwrap_or(u16::MAX);
    out[14..FIXED].copy_from_slice(&len.to_be_bytes());
    let at = out.len() - HMAC_LEN;
    let tag = sign(key, &out[..at]);
    out[at..].copy_from_slice(tag.as_ref());
    out
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The HMAC of a header whose last [`HMAC_LEN`] bytes (the tag) are zero; `signed` is the header
/// without them.
fn sign(key: &hmac::Key, signed: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(signed);
    ctx.update(&[0; HMAC_LEN]);
    ctx.sign()
}

/// Rewrites the HMAC at the end of the header at the start of `buf` (as long as its length field
/// says) so that `key` accepts it: lets the fuzzer reach the fields behind the HMAC.
pub(crate) fn resign(buf: &mut [u8], key: &hmac::Key) {
    let total = request_wanted(buf);
    if total < FIXED + HMAC_LEN || total > buf.len() {
        return;
    }
    let at = total - HMAC_LEN;
    let tag = sign(key, &buf[..at]);
    buf[at..total].copy_from_slice(tag.as_ref());
}

/// How many bytes the header at the start of `buf` needs in all, as far as `buf` tells: the
/// fixed part, then the length it gives. Lets a reader take exactly the header and no more.
pub(crate) fn request_wanted(buf: &[u8]) -> usize {
    match buf.get(14..FIXED) {
        Some(len) => FIXED + usize::from(u16::from_be_bytes([len[0], len[1]])),
        None => FIXED,
    }
}

/// Parses and authenticates a header at the start of `buf` with `key`. Freshness and replay are
/// the caller's ([`super::replay::NonceCache`]): this function has no clock.
pub(crate) fn parse_request(buf: &[u8], key: &hmac::Key) -> Parse<PeerRequest> {
    let n = buf.len().min(SIGNATURE.len());
    if buf[..n] != SIGNATURE[..n] {
        return Parse::Invalid(CodecError::Framing("not a PROXY v2 header"));
    }
    if buf.len() < FIXED {
        return Parse::Incomplete;
    }
    if buf[12] != V2_PROXY {
        return Parse::Invalid(CodecError::Framing("not a v2 PROXY command"));
    }
    let addresses = match buf[13] {
        TCP4 => 12,
        TCP6 => 36,
        _ => return Parse::Invalid(CodecError::Framing("not TCP over IPv4 or IPv6")),
    };
    let total = request_wanted(buf);
    if total > MAX_PEER_HEADER {
        return Parse::Invalid(CodecError::TooLong);
    }
    if total < FIXED + addresses + 3 + HMAC_TLV_HEAD.len() + HMAC_LEN {
        return Parse::Invalid(CodecError::Framing("too short for its TLVs"));
    }
    if buf.len() < total {
        return Parse::Incomplete;
    }
    let header = &buf[..total];
    let (signed, tag) = header.split_at(total - HMAC_LEN);
    if !signed.ends_with(&HMAC_TLV_HEAD) {
        return Parse::Invalid(CodecError::Framing("the HMAC is not last"));
    }
    if constant_time::verify_slices_are_equal(sign(key, signed).as_ref(), tag).is_err() {
        return Parse::Invalid(CodecError::Hmac);
    }
    match fields(header) {
        Ok(value) => Parse::Complete {
            value,
            consumed: total,
        },
        Err(e) => Parse::Invalid(e),
    }
}

/// The fields of an authenticated header, in their one order.
fn fields(header: &[u8]) -> Result<PeerRequest, CodecError> {
    use ppp::v2::{Addresses, Header, Protocol, TypeLengthValue};
    let malformed = CodecError::Framing("malformed TLVs");
    let h = Header::try_from(header).map_err(|_| CodecError::Framing("malformed v2 header"))?;
    if h.protocol != Protocol::Stream {
        return Err(CodecError::Framing("not TCP"));
    }
    let (source, destination) = match h.addresses {
        Addresses::IPv4(a) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            SocketAddr::new(a.destination_address.into(), a.destination_port),
        ),
        Addresses::IPv6(a) => {
            let src = canonical(SocketAddr::new(a.source_address.into(), a.source_port));
            let dst = canonical(SocketAddr::new(a.destination_address.into(), a.destination_port));
            if src.is_ipv4() && dst.is_ipv4() {
                return Err(CodecError::Field("two IPv4 addresses sent as IPv6"));
            }
            (src, dst)
        }
        _ => return Err(CodecError::Framing("not TCP over IPv4 or IPv6")),
    };
    let tlvs: Vec<TypeLengthValue<'_>> = h.tlvs().collect::<Result<_, _>>().map_err(|_| malformed)?;
    let (authority, vpce, edgemux) = match tlvs.as_slice() {
        [a, e] => (a, None, e),
        [a, v, e] if v.kind == TLV_AWS => (a, Some(v), e),
        _ => return Err(CodecError::Framing("unexpected TLVs")),
    };
    if authority.kind != TLV_AUTHORITY || edgemux.kind != TLV_EDGEMUX {
        return Err(CodecError::Framing("unexpected TLVs"));
    }
    let host = std::str::from_utf8(&authority.value).map_err(|_| CodecError::Field("host"))?;
    let mut req = PeerRequest::dial(Op::DialHttp, host, 0, source, destination)?;
    if let Some(v) = vpce {
        match v.value.split_first() {
            Some((&AWS_VPCE_ID, id)) if is_vpce(id) => {
                req.vpce = Some(String::from_utf8_lossy(id).into_owned());
            }
            _ => return Err(CodecError::Field("vpce")),
        }
    }
    let subs: Vec<TypeLengthValue<'_>> = ppp::v2::TypeLengthValues::from(&edgemux.value[..])
        .collect::<Result<_, _>>()
        .map_err(|_| malformed)?;
    let mut subs = subs.iter().peekable();
    req.op = match take(&mut subs, SUB_OP, "op")? {
        [code] => Op::from_code(*code).ok_or(CodecError::Field("op"))?,
        _ => return Err(CodecError::Field("op")),
    };
    req.port = u16::from_be_bytes(fixed(take(&mut subs, SUB_PORT, "port")?, "port")?);
    if let Some(key) = subs.next_if(|t| t.kind == SUB_ON_BEHALF) {
        req.on_behalf = Some(KeyFingerprint::from_sha256(fixed(&key.value, "on-behalf key")?));
    }
    let sender = std::str::from_utf8(take(&mut subs, SUB_SENDER, "sender")?)
        .map_err(|_| CodecError::Field("sender"))?;
    let timestamp = fixed(take(&mut subs, SUB_TIMESTAMP, "timestamp")?, "timestamp")?;
    let nonce = fixed(take(&mut subs, SUB_NONCE, "nonce")?, "nonce")?;
    take(&mut subs, SUB_HMAC, "hmac")?;
    if subs.next().is_some() {
        return Err(CodecError::Framing("the HMAC is not last"));
    }
    req.stamped(sender, u64::from_be_bytes(timestamp), nonce)
}

type Subs<'a> = std::iter::Peekable<std::slice::Iter<'a, ppp::v2::TypeLengthValue<'a>>>;

/// The value of the next sub-TLV, which must be of `kind`.
fn take<'a>(subs: &mut Subs<'a>, kind: u8, what: &'static str) -> Result<&'a [u8], CodecError> {
    subs.next_if(|t| t.kind == kind)
        .map(|t| &t.value[..])
        .ok_or(CodecError::Field(what))
}

fn fixed<const N: usize>(value: &[u8], what: &'static str) -> Result<[u8; N], CodecError> {
    <[u8; N]>::try_from(value).map_err(|_| CodecError::Field(what))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const NOW: u64 = 1_700_000_000_123;

    fn key() -> hmac::Key {
        hmac_key(&[7; 32])
    }

    fn v4_request() -> PeerRequest {
        PeerRequest::dial(
            Op::DialHttp,
            "myapp-abcd2345.gw.test",
            80,
            "198.51.100.7:51234".parse().unwrap(),
            "10.0.0.1:443".parse().unwrap(),
        )
        .unwrap()
        .with_vpce("vpce-0123456789abcdef0")
        .unwrap()
        .on_behalf_of(KeyFingerprint::from_sha256([9; 32]))
        .stamped("r1.k3j9", NOW, [5; NONCE_LEN])
        .unwrap()
    }

    /// A request of each shape: both families, mixed, and without the optional fields.
    fn samples() -> Vec<PeerRequest> {
        let plain = PeerRequest::dial(
            Op::DialTcp,
            "db-abcd2345",
            5432,
            "[2001:db8::7]:40000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        )
        .unwrap()
        .stamped("r2", NOW, [1; NONCE_LEN])
        .unwrap();
        let mixed = PeerRequest::dial(
            Op::DialHttp,
            "a.gw.test",
            8080,
            "[2001:db8::7]:40000".parse().unwrap(),
            "[::ffff:10.0.0.1]:443".parse().unwrap(),
        )
        .unwrap()
        .stamped("r3.x", u64::MAX, [0xff; NONCE_LEN])
        .unwrap();
        vec![v4_request(), plain, mixed]
    }

    /// The header with its length and HMAC recomputed after an edit.
    fn resign(mut bytes: Vec<u8>) -> Vec<u8> {
        let len = u16::try_from(bytes.len() - FIXED).unwrap();
        bytes[14..16].copy_from_slice(&len.to_be_bytes());
        super::resign(&mut bytes, &key());
        bytes
    }

    fn position(haystack: &[u8], needle: &[u8]) -> usize {
        haystack.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    #[test]
    fn every_prefix_is_incomplete_and_the_whole_is_exact() {
        for req in samples() {
            let bytes = encode_request(&req, &key());
            for n in 0..bytes.len() {
                assert_eq!(
                    parse_request(&bytes[..n], &key()),
                    Parse::Incomplete,
                    "prefix {n}"
                );
                assert!(request_wanted(&bytes[..n]) > n, "wanted at {n}");
            }
            assert_eq!(request_wanted(&bytes), bytes.len());
            let mut longer = bytes.clone();
            longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let want = Parse::Complete {
                value: req.clone(),
                consumed: bytes.len(),
            };
            assert_eq!(parse_request(&bytes, &key()), want);
            assert_eq!(
                parse_request(&longer, &key()),
                want,
                "trailing bytes are not read"
            );
        }
    }

    #[test]
    fn requests_round_trip() {
        for req in samples() {
            let bytes = encode_request(&req, &key());
            let Parse::Complete { value, .. } = parse_request(&bytes, &key()) else {
                panic!("{req:?}");
            };
            assert_eq!(value, req);
            assert_eq!(encode_request(&value, &key()), bytes);
        }
        let req = v4_request();
        assert_eq!(req.op(), Op::DialHttp);
        assert_eq!(req.host(), "myapp-abcd2345.gw.test");
        assert_eq!(req.port(), 80);
        assert_eq!(req.source(), "198.51.100.7:51234".parse().unwrap());
        assert_eq!(req.destination(), "10.0.0.1:443".parse().unwrap());
        assert_eq!(req.vpce(), Some("vpce-0123456789abcdef0"));
        assert_eq!(req.on_behalf(), Some(KeyFingerprint::from_sha256([9; 32])));
        assert_eq!(
            (req.sender(), req.timestamp_ms(), req.nonce()),
            ("r1.k3j9", NOW, &[5; 16])
        );
    }

    #[test]
    fn mapped_addresses_are_ipv4_and_ipv6_is_used_only_when_needed() {
        let mapped = PeerRequest::dial(
            Op::DialHttp,
            "a.gw.test",
            80,
            "[::ffff:192.0.2.1]:1000".parse().unwrap(),
            "[::ffff:10.0.0.1]:443".parse().unwrap(),
        )
        .unwrap()
        .stamped("r1", NOW, [0; NONCE_LEN])
        .unwrap();
        assert_eq!(mapped.source(), "192.0.2.1:1000".parse().unwrap());
        let bytes = encode_request(&mapped, &key());
        assert_eq!(bytes[13], TCP4);
        // The same addresses as TCP6 are not the one encoding of this request.
        let mixed = encode_request(&samples()[2], &key());
        assert_eq!(mixed[13], TCP6);
        let mut both_mapped = mixed.clone();
        both_mapped[16..32].copy_from_slice(&std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets());
        assert_eq!(
            parse_request(&resign(both_mapped), &key()),
            Parse::Invalid(CodecError::Field("two IPv4 addresses sent as IPv6"))
        );
    }

    #[test]
    fn other_proxy_v2_readers_agree() {
        use ppp::v2::{Builder, Command, Protocol, Type, Version};
        let req = v4_request();
        let bytes = encode_request(&req, &key());
        // ppp's builder writes the same frame around the same TLV values.
        let parsed = ppp::v2::Header::try_from(&bytes[..]).unwrap();
        let tlvs: Vec<_> = parsed.tlvs().map(Result::unwrap).collect();
        let kinds: Vec<u8> = tlvs.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [TLV_AUTHORITY, TLV_AWS, TLV_EDGEMUX]);
        let built = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (req.source(), req.destination()),
        )
        .write_tlv(Type::Authority, req.host().as_bytes())
        .unwrap()
        .write_tlv(TLV_AWS, &tlvs[1].value[..])
        .unwrap()
        .write_tlv(TLV_EDGEMUX, &tlvs[2].value[..])
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(built, bytes);
        // The main listener's PROXY stage reads the visitor and the VPC endpoint from it.
        let crate::proxy_protocol::Parse::Complete { header, consumed } =
            crate::proxy_protocol::parse_header(&bytes)
        else {
            panic!("the PROXY stage refused a peer header");
        };
        assert_eq!(consumed, bytes.len());
        assert_eq!(header.source, Some(req.source()));
        assert_eq!(header.destination, Some(req.destination()));
        assert_eq!(header.vpce_id.as_deref(), req.vpce());
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        for req in samples() {
            let bytes = encode_request(&req, &key());
            let tag_tlv = bytes.len() - HMAC_LEN - HMAC_TLV_HEAD.len();
            for i in 0..bytes.len() {
                for bit in 0..8 {
                    let mut flipped = bytes.clone();
                    flipped[i] ^= 1 << bit;
                    // Room for a length that grew, so a refusal is not mistaken for a wait.
                    flipped.extend_from_slice(&[0; 64]);
                    let got = parse_request(&flipped, &key());
                    assert!(!matches!(got, Parse::Complete { .. }), "byte {i} bit {bit}");
                    let authenticated = (FIXED..tag_tlv).contains(&i) || i >= tag_tlv + 3;
                    if authenticated {
                        assert_eq!(got, Parse::Invalid(CodecError::Hmac), "byte {i} bit {bit}");
                    }
                }
            }
        }
    }

    #[test]
    fn another_key_is_refused() {
        let bytes = encode_request(&v4_request(), &hmac_key(&[8; 32]));
        assert_eq!(parse_request(&bytes, &key()), Parse::Invalid(CodecError::Hmac));
    }

    #[test]
    fn oversize_is_refused_before_it_is_read() {
        let mut head = SIGNATURE.to_vec();
        head.extend_from_slice(&[V2_PROXY, TCP4]);
        head.extend_from_slice(&u16::try_from(MAX_PEER_HEADER - FIXED + 1).unwrap().to_be_bytes());
        assert_eq!(parse_request(&head, &key()), Parse::Invalid(CodecError::TooLong));
        let mut max = head.clone();
        max[14..16].copy_from_slice(&u16::try_from(MAX_PEER_HEADER - FIXED).unwrap().to_be_bytes());
        assert_eq!(parse_request(&max, &key()), Parse::Incomplete, "1 KiB is allowed");
        // The largest request this version writes fits with room to spare.
        let largest = PeerRequest::dial(
            Op::DialTcp,
            &["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join("."),
            u16::MAX,
            "[2001:db8::7]:40000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        )
        .unwrap()
        .with_vpce(&"v".repeat(MAX_VPCE))
        .unwrap()
        .on_behalf_of(KeyFingerprint::from_sha256([1; 32]))
        .stamped(
            &["r".repeat(63), "s".repeat(62), "t".into()].join("."),
            NOW,
            [2; 16],
        )
        .unwrap();
        assert_eq!(largest.host().len(), MAX_HOST);
        assert_eq!(largest.sender().len(), MAX_REPLICA_ID);
        assert_eq!(encode_request(&largest, &key()).len(), 619);
    }

    #[test]
    fn fields_are_checked_where_they_are_set() {
        let (src, dst) = ("192.0.2.1:1".parse().unwrap(), "192.0.2.2:2".parse().unwrap());
        let dial = |host: &str| PeerRequest::dial(Op::DialHttp, host, 80, src, dst);
        for host in ["", "a b", "-a.gw.test", "a..b", &"a.".repeat(127)] {
            assert_eq!(dial(host).unwrap_err(), CodecError::Field("host"), "{host:?}");
        }
        let ok = dial("a.gw.test").unwrap();
        for vpce in ["", "vpce 1", &"v".repeat(MAX_VPCE + 1)] {
            assert!(ok.clone().with_vpce(vpce).is_err(), "{vpce:?}");
        }
        for rid in ["", "R1", "r_1", &"r".repeat(MAX_REPLICA_ID + 1)] {
            assert!(ok.clone().stamped(rid, NOW, [0; 16]).is_err(), "{rid:?}");
            assert!(!is_replica_id(rid));
        }
        // Unstamped, a request encodes to a header that is refused, never to another request.
        let unstamped = encode_request(&ok, &key());
        assert_eq!(
            parse_request(&unstamped, &key()),
            Parse::Invalid(CodecError::Field("sender"))
        );
    }

    #[test]
    fn anything_but_the_one_grammar_is_refused() {
        let bytes = encode_request(&v4_request(), &key());
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\n", &key()),
            Parse::Invalid(CodecError::Framing(_))
        ));
        let mut local = bytes.clone();
        local[12] = 0x20;
        assert!(matches!(
            parse_request(&local, &key()),
            Parse::Invalid(CodecError::Framing(_))
        ));
        // An unknown op, signed.
        let at = position(&bytes, &[SUB_OP, 0, 1, 1, SUB_PORT]) + 3;
        let mut op = bytes.clone();
        op[at] = 9;
        assert_eq!(
            parse_request(&resign(op), &key()),
            Parse::Invalid(CodecError::Field("op"))
        );
        // A reserved op parses; serving it is another matter.
        let mut ping = bytes.clone();
        ping[at] = 6;
        let Parse::Complete { value, .. } = parse_request(&resign(ping), &key()) else {
            panic!("ping");
        };
        assert_eq!(value.op(), Op::Ping);
        assert!(!value.op().is_dial());
        // An extra standard TLV (NOOP) between AUTHORITY and the rest, signed.
        let at = position(&bytes, &[TLV_AWS]);
        let mut extra = bytes[..at].to_vec();
        extra.extend_from_slice(&[0x04, 0, 1, 0]);
        extra.extend_from_slice(&bytes[at..]);
        assert_eq!(
            parse_request(&resign(extra), &key()),
            Parse::Invalid(CodecError::Framing("unexpected TLVs"))
        );
        // The HMAC that is not last.
        let mut moved = bytes.clone();
        let n = moved.len();
        moved[n - HMAC_LEN - 3] = SUB_NONCE;
        assert_eq!(
            parse_request(&moved, &key()),
            Parse::Invalid(CodecError::Framing("the HMAC is not last"))
        );
    }
}
