//! Micro-benchmarks of the pure parsers on the connection path, through the public API.
//!
//! `cargo bench --bench parsers` (add `-- --quick` for a fast pass). No timing assertions: these
//! numbers are for spotting regressions by eye, the end-to-end comparison is `bench/run.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use edgemux::http::host::parse_host;
use edgemux::names::{canonical_host, parse_name};
use edgemux::proxy_protocol::{crc32c, parse_header, Parse};
use edgemux::sniff::{parse_protocol, Protocol, Sniff};

/// What HAProxy's `send-proxy` writes, followed by the client's first bytes.
const PROXY_V1: &[u8] = b"PROXY TCP4 198.51.100.7 10.0.0.1 51234 443\r\nSSH-2.0-OpenSSH_9.2p1\r\n";

/// An AWS NLB-style v2 header (PROXY, TCP4) with a VPC endpoint TLV (0xEA) and a CRC32C TLV
/// (0x03), followed by the start of a ClientHello. Built like the unit tests in
/// `src/proxy_protocol.rs`.
fn proxy_v2_nlb() -> Vec<u8> {
    let vpce = b"\x01vpce-0123456789abcdef0";
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    let len = 12 + 3 + vpce.len() + 3 + 4;
    h.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    h.extend_from_slice(&[198, 51, 100, 7, 10, 0, 0, 1]);
    h.extend_from_slice(&51234u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h.push(0xEA);
    h.extend_from_slice(&u16::try_from(vpce.len()).unwrap().to_be_bytes());
    h.extend_from_slice(vpce);
    h.extend_from_slice(&[0x03, 0, 4, 0, 0, 0, 0]);
    let crc = crc32c(&h);
    let at = h.len() - 4;
    h[at..].copy_from_slice(&crc.to_be_bytes());
    h.extend_from_slice(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    h
}

fn proxy_protocol(c: &mut Criterion) {
    let v2 = proxy_v2_nlb();
    // Sanity: the samples parse (outside the timed loops).
    assert!(matches!(parse_header(PROXY_V1), Parse::Complete { .. }));
    match parse_header(&v2) {
        Parse::Complete { header, .. } => {
            assert_eq!(header.vpce_id.as_deref(), Some("vpce-0123456789abcdef0"));
        }
        other => panic!("v2 sample did not parse: {other:?}"),
    }

    let mut g = c.benchmark_group("proxy_protocol::parse_header");
    g.throughput(Throughput::Elements(1));
    g.bench_function("v1 TCP4 line", |b| b.iter(|| parse_header(black_box(PROXY_V1))));
    g.bench_function("v2 NLB, vpce + crc32c TLVs", |b| {
        b.iter(|| parse_header(black_box(&v2)))
    });
    g.bench_function("not a header (ClientHello)", |b| {
        b.iter(|| parse_header(black_box(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")))
    });
    g.bench_function("v2 incomplete (first 20 bytes)", |b| {
        b.iter(|| parse_header(black_box(&v2[..20])))
    });
    g.finish();
}

fn sniff(c: &mut Criterion) {
    let samples: &[(&str, &[u8], Protocol)] = &[
        (
            "TLS ClientHello start",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            Protocol::Tls,
        ),
        (
            "SSH banner",
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
            Protocol::Ssh,
        ),
        ("HTTP GET", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Protocol::Http),
        ("HTTP OPTIONS", b"OPTIONS * HTTP/1.1\r\n", Protocol::Http),
        ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Protocol::Http),
    ];
    let mut g = c.benchmark_group("sniff::parse_protocol");
    g.throughput(Throughput::Elements(1));
    for (label, bytes, want) in samples {
        assert_eq!(parse_protocol(bytes), Sniff::Found(*want), "{label}");
        g.bench_function(*label, |b| b.iter(|| parse_protocol(black_box(bytes))));
    }
    g.bench_function("incomplete (\"SS\")", |b| {
        b.iter(|| parse_protocol(black_box(b"SS")))
    });
    g.bench_function("garbage", |b| {
        b.iter(|| parse_protocol(black_box(b"\x00\x01\x02\x03")))
    });
    g.finish();
}

fn host(c: &mut Criterion) {
    let samples: &[(&str, &[u8])] = &[
        ("tunnel host with port", b"MyApp-abcdefgh.GW.example.com:443"),
        ("apex, no port", b"gw.example.com"),
        ("IPv6 literal", b"[2001:db8::1]:8443"),
        ("invalid (space)", b"my app.example.com"),
    ];
    let mut g = c.benchmark_group("http::host::parse_host");
    g.throughput(Throughput::Elements(1));
    for (label, raw) in samples {
        g.bench_function(*label, |b| b.iter(|| parse_host(black_box(raw))));
    }
    let long = "a".repeat(253);
    assert!(parse_host(long.as_bytes()).is_ok());
    g.bench_function("253-byte host", |b| {
        b.iter(|| parse_host(black_box(long.as_bytes())))
    });
    g.finish();
}

fn names(c: &mut Criterion) {
    let mut g = c.benchmark_group("ssh::names");
    g.throughput(Throughput::Elements(1));
    assert!(parse_name("MyApp").is_ok());
    g.bench_function("parse_name short", |b| b.iter(|| parse_name(black_box("MyApp"))));
    let longest = "a".repeat(edgemux::names::MAX_NAME);
    g.bench_function("parse_name longest", |b| {
        b.iter(|| parse_name(black_box(&longest)))
    });
    g.bench_function("parse_name rejected", |b| {
        b.iter(|| parse_name(black_box("bad_name!")))
    });
    let domain = "gw.example.com";
    assert_eq!(
        canonical_host("App-AbCdEfGh.GW.example.com.", domain).as_deref(),
        Some("app-abcdefgh.gw.example.com")
    );
    g.bench_function("canonical_host full", |b| {
        b.iter(|| canonical_host(black_box("App-AbCdEfGh.GW.example.com."), black_box(domain)))
    });
    g.bench_function("canonical_host short", |b| {
        b.iter(|| canonical_host(black_box("app-abcdefgh"), black_box(domain)))
    });
    g.bench_function("canonical_host rejected", |b| {
        b.iter(|| canonical_host(black_box("a.b.gw.example.com"), black_box(domain)))
    });
    g.finish();
}

criterion_group!(benches, proxy_protocol, sniff, host, names);
criterion_main!(benches);
