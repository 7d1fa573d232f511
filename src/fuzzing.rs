//! Fuzz entry points, one per parser, each asserting the parser's invariants. `fuzz/` (cargo-fuzz)
//! calls them with generated input; `tests/fuzz_corpus.rs` replays every corpus file through the
//! same functions on stable, so CI exercises them.
#![allow(clippy::panic)]

use crate::sniff::{parse_protocol, Sniff, MAX_SNIFF};

/// Sniffing: a decision never needs more than `MAX_SNIFF` bytes, and once a prefix is decided
/// every longer input gets the same answer.
pub fn sniff(data: &[u8]) {
    let mut decided: Option<Sniff> = None;
    for n in 0..=data.len().min(MAX_SNIFF + 4) {
        let s = parse_protocol(&data[..n]);
        match (decided, s) {
            (Some(d), s) if d != s => panic!("decision changed from {d:?} to {s:?} at {n}"),
            (None, Sniff::Incomplete) => {
                assert!(n < MAX_SNIFF, "undecided after {n} bytes");
            }
            (None, s) => decided = Some(s),
            _ => {}
        }
    }
}

/// Host parsing: the result is lowercase, bounded, without port, and parsing it again is stable.
pub fn host(data: &[u8]) {
    if let Ok(h) = crate::http::host::parse_host(data) {
        assert!(h.len() <= crate::http::host::MAX_HOST);
        assert_eq!(h, h.to_ascii_lowercase());
        assert_eq!(
            crate::http::host::parse_host(h.as_bytes()).as_deref(),
            Ok(h.as_str())
        );
    }
}

/// gRPC deadlines (`grpc-timeout`): a parsed value is at most 8 digits of hours, and the value
/// printed back in milliseconds parses to the same duration when it fits.
pub fn grpc_timeout(data: &[u8]) {
    if let Some(d) = crate::http::grpc::parse_timeout(data) {
        assert!(data.len() <= 9);
        assert!(d <= std::time::Duration::from_secs(99_999_999 * 3600));
        let ms = d.as_millis();
        if d.subsec_nanos() % 1_000_000 == 0 && ms < 100_000_000 {
            let again = crate::http::grpc::parse_timeout(format!("{ms}m").as_bytes());
            assert_eq!(again, Some(d));
        }
    }
}

/// Tunnel names, hosts and key fingerprints: a valid name fits a DNS label with the key id,
/// round-trips, and the host built from it resolves back to itself; a parsed fingerprint prints
/// back to what parses to it.
pub fn name(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = crate::names::parse_name(text) {
        let host = crate::names::host_for(&n, "abcdefgh", "gw.test");
        assert!(crate::names::short_host(&n, "abcdefgh").len() <= 63);
        assert_eq!(crate::names::parse_name(n.as_str()).as_ref(), Ok(&n));
        assert_eq!(crate::names::canonical_host(&host, "gw.test"), Some(host.clone()));
    }
    if let Some(fp) = crate::names::KeyFingerprint::parse(text) {
        assert_eq!(crate::names::KeyFingerprint::parse(&fp.to_string()), Some(fp));
        assert!(crate::names::is_key_id(&fp.key_id()));
    }
    if let Some(h) = crate::names::canonical_host(text, "gw.test") {
        assert!(h.ends_with(".gw.test"));
        assert_eq!(crate::names::canonical_host(&h, "gw.test"), Some(h.clone()));
    }
}

/// Config parsing: never panics; an accepted config has at least one listener and a valid domain.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = crate::config::parse(text) {
        assert!(!c.listeners.is_empty());
        assert!(crate::names::is_domain(&c.domain));
    }
}

/// PROXY headers: `consumed` never exceeds the input or the protocol's bounds, a complete header
/// parses the same with trailing bytes, and its prefixes are incomplete, never invalid.
pub fn proxy_header(data: &[u8]) {
    use crate::proxy_protocol::{parse_header, Parse, MAX_V1, MAX_V2};
    if let Parse::Complete { header, consumed } = parse_header(data) {
        assert!(consumed <= data.len());
        let max = if header.version == 1 { MAX_V1 } else { MAX_V2 };
        assert!(consumed <= max);
        let mut longer = data[..consumed].to_vec();
        longer.extend_from_slice(b"\x16\x03\x01 trailing");
        assert_eq!(parse_header(&longer), Parse::Complete { header, consumed });
        for n in 0..consumed {
            assert_eq!(parse_header(&data[..n]), Parse::Incomplete, "prefix {n}");
        }
    }
}

/// ClientHello-based routing: whatever rustls accepts as a ClientHello, the route we derive from
/// its SNI and ALPN (our server preference h2, http/1.1, ssh) is well defined, and a tunnel host
/// taken from the SNI is canonical.
pub fn client_hello(data: &[u8]) {
    use crate::tls::{ALPN_H2, ALPN_HTTP1, ALPN_SSH};
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = data;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let Ok(Some(accepted)) = acceptor.accept() else {
        return;
    };
    let hello = accepted.client_hello();
    if let Some(sni) = hello.server_name() {
        if let Some(host) = crate::names::canonical_host(sni, "gw.test") {
            assert_eq!(crate::names::canonical_host(&host, "gw.test"), Some(host.clone()));
        }
    }
    let offered: Vec<Vec<u8>> = hello
        .alpn()
        .map(|it| it.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    let chosen = [ALPN_H2, ALPN_HTTP1, ALPN_SSH]
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p));
    match chosen {
        Some(p) => assert!(crate::route::by_alpn(Some(p)).is_some()),
        None => assert_eq!(crate::route::by_alpn(None), None),
    }
}

/// The key the `peer_header` corpus is signed with.
const PEER_FUZZ_KEY: [u8; 32] = [0x42; 32];

/// Peer link headers and status replies: `consumed` stays within the input and the bound, a
/// complete parse re-encodes to the same bytes with the same key, and its prefixes are
/// incomplete. Each input is parsed as it is (the HMAC check) and once more re-signed, so the
/// fields behind the HMAC are fuzzed too.
pub fn peer_header(data: &[u8]) {
    use crate::cluster::peer::codec::{
        encode_request, hmac_key, parse_request, resign, Parse, MAX_PEER_HEADER,
    };
    use crate::cluster::peer::status::{encode_reply, parse_reply, MAX_REPLY};
    let key = hmac_key(&PEER_FUZZ_KEY);
    let mut signed = data.to_vec();
    resign(&mut signed, &key);
    for input in [data, &signed[..]] {
        if let Parse::Complete { value, consumed } = parse_request(input, &key) {
            assert!(consumed <= input.len() && consumed <= MAX_PEER_HEADER);
            assert_eq!(encode_request(&value, &key), input[..consumed]);
            for n in 0..consumed {
                assert_eq!(parse_request(&input[..n], &key), Parse::Incomplete, "prefix {n}");
            }
        }
    }
    if let Parse::Complete { value, consumed } = parse_reply(data) {
        assert!(consumed <= data.len() && consumed <= MAX_REPLY);
        assert_eq!(encode_reply(value.status, &value.reason), data[..consumed]);
        for n in 0..consumed {
            assert_eq!(parse_reply(&data[..n]), Parse::Incomplete, "prefix {n}");
        }
    }
}

/// Directory keys and values as another replica (or a store an attacker wrote to) may hand
/// them over: the input is `host\nvalue`. Nothing panics; a value over the size bound is refused;
/// a route or replica record that decodes re-encodes to one that decodes the same.
pub fn directory_value(data: &[u8]) {
    use crate::cluster::store::{
        decode_replica, decode_route, encode_replica, encode_route, EntryError, Keys,
    };
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (host, value) = (
        String::from_utf8_lossy(&data[..split]),
        data.get(split + 1..).unwrap_or_default(),
    );
    let reserved = |h: &str, _: &crate::names::KeyFingerprint| h == "reserved.example.com";
    match decode_route(&host, value, &reserved) {
        Ok(entry) => {
            let again = encode_route(&entry);
            assert!(again.is_ok(), "a decoded route encodes: {entry:?}");
            let again = again.unwrap_or_default();
            assert_eq!(decode_route(&host, &again, &reserved), Ok(entry));
        }
        Err(EntryError::TooLarge) => assert!(value.len() > 1024),
        Err(_) => {}
    }
    if let Ok(record) = decode_replica(value) {
        let again = encode_replica(&record);
        assert!(again.is_ok(), "a decoded record encodes: {record:?}");
        assert_eq!(decode_replica(&again.unwrap_or_default()).ok(), Some(record));
    }
    let _ = Keys::new("fuzz").parse(data);
}

/// A peer's answer to `list` (`cluster::listing::parse`): `host SP route-JSON` lines. Nothing
/// panics; every route taken is one line's, decodes as the store's checks say, and taken plus
/// refused lines are all the non-empty lines.
pub fn peer_list(data: &[u8]) {
    use crate::cluster::listing::parse;
    use crate::cluster::store::{decode_route, encode_route};
    let reserved = |h: &str, _: &crate::names::KeyFingerprint| h == "reserved.example.com";
    let (routes, dropped) = parse(data, |h, v| decode_route(h, v, &reserved));
    let lines = data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    assert_eq!(routes.len() + dropped, lines);
    for (host, entry) in routes {
        let again = encode_route(&entry).unwrap_or_default();
        assert_eq!(decode_route(&host, &again, &reserved), Ok(entry));
    }
}

/// ACME values as a cluster store (or someone who wrote to it) hands them over: a certificate
/// record or a budget counter. Nothing panics; an oversized value is refused; what decodes
/// re-encodes to the same record; a counter never counts past its limit.
pub fn acme_value(data: &[u8]) {
    use crate::acme::shared::{
        decode_cert, decode_counter, encode_cert, encode_counter, next_counter, RecordError, MAX_CERT_VALUE,
    };
    match decode_cert(data) {
        Ok(record) => {
            let again = encode_cert(&record);
            assert!(again.is_ok(), "a decoded record encodes: {record:?}");
            assert_eq!(decode_cert(&again.unwrap_or_default()), Ok(record));
        }
        Err(RecordError::TooLarge) => assert!(data.len() > MAX_CERT_VALUE),
        Err(RecordError::Malformed) => {}
    }
    let counter = decode_counter(data);
    if let Ok(c) = counter {
        assert_eq!(decode_counter(&encode_counter(&c)), Ok(c));
        let limit = 3;
        if let Some(next) = next_counter(Some(Ok(c)), c.window, limit) {
            assert!(next.count as usize <= limit);
        }
    }
}

/// A Redis feed entry as the stream hands it over (`store::feed`): the input is one
/// `name=value` field per line. Nothing panics; an entry that decodes re-encodes to one that
/// decodes the same; a stream id that parses prints as what parses back to it.
pub fn feed_entry(data: &[u8]) {
    use crate::cluster::store::feed::{FeedEvent, StreamId};
    let fields: Vec<(&[u8], &[u8])> = data
        .split(|&b| b == b'\n')
        .map(|line| match line.iter().position(|&b| b == b'=') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &[][..]),
        })
        .collect();
    if let Ok(event) = FeedEvent::decode(fields.iter().copied()) {
        let again = event.fields();
        let decoded = FeedEvent::decode(again.iter().map(|(n, v)| (n.as_bytes(), v.as_slice())));
        assert_eq!(decoded.as_ref(), Ok(&event));
    }
    if let Some(id) = StreamId::parse(data) {
        assert_eq!(StreamId::parse(id.to_string().as_bytes()), Some(id));
    }
}

/// The tunnel options an owner types after the host (`rules::options`), and the request headers
/// `rules::decide` reads. Nothing panics; parsed options stay within their bounds and print as a
/// line that parses back to them; any header bytes give a decision.
pub fn access_options(data: &[u8]) {
    use crate::rules::{options, Rules, Visit};
    if let Ok(o) = options::parse(data) {
        assert!(o
            .allow
            .as_ref()
            .is_none_or(|a| !a.is_empty() && a.len() <= options::MAX_ALLOW));
        let mut line = Vec::new();
        if let Some((u, p)) = &o.auth {
            assert!(u.len() <= options::MAX_USER && p.len() <= options::MAX_PASSWORD);
            line.push(format!("auth={u}:{p}"));
        }
        if let Some(allow) = &o.allow {
            let nets: Vec<String> = allow.iter().map(ToString::to_string).collect();
            line.push(format!("allow={}", nets.join(",")));
        }
        if let Some(rate) = o.rate {
            assert!(rate.count >= 1 && rate.count <= options::MAX_RATE);
            line.push(format!("rate={rate}"));
        }
        if o.private {
            line.push("private".into());
        }
        match o.upstream {
            Some(options::Upstream::Passthrough) => line.push("tls=passthrough".into()),
            Some(u) => line.push(format!("upstream={}", u.label())),
            None => {}
        }
        assert_eq!(options::parse(line.join(" ").as_bytes()).as_ref(), Ok(&o));
    }
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let (authorization, cookie, query) = (parts.next(), parts.next(), parts.next());
    let key = crate::rules::token::LinkKey::new(b"fuzz");
    let rules = Rules::from_options(options::Options {
        auth: Some(("a".into(), "b".into())),
        private: true,
        ..options::Options::default()
    });
    let visit = Visit {
        host: "app-abcd.gw.test",
        client: std::net::IpAddr::from([192, 0, 2, 1]),
        authorization,
        cookie,
        path: "/",
        query: query.and_then(|q| std::str::from_utf8(q).ok()),
        now: std::time::Instant::now(),
        unix_now: 1_000_000,
    };
    let _ = crate::rules::decide(&visit, &rules, None, &key);
}
