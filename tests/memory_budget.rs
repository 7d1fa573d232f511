//! The tunnel buffer budget end to end, against the real binary: visitors that ask for a large
//! body and never read it (over HTTP/1.1, and over h2 with tiny windows) keep the gateway's RSS
//! under the documented bound while another visitor is served, and are cut at
//! `limits.write_idle_timeout`; silent h2 connections close at `header_timeout` and h2c is
//! refused; one visitor holding unread streams leaves a tunnel's channels to another.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::http::{http_backend, pattern, rss_kib, RssSampler, Visitor};
use common::pki::client_config;
use common::process::{poll_until, Proc};
use common::prom::Admin;
use common::ssh::{KeyKind, Transport};
use common::{Gateway, TestEnv, DOMAIN, SETUP};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// What each stalled visitor asks for.
const BODY: u64 = 64 * MIB;
const VISITORS: usize = 64;
/// The stalled visitors come from this many addresses (clients), `VISITORS / CLIENTS` each.
const CLIENTS: u8 = 4;
const BUDGET: u64 = 48 * MIB;
const SHARE: u64 = 8 * MIB;
const WRITE_IDLE: Duration = Duration::from_secs(5);
/// The most the gateway holds for stalled readers, by the formula in README and ARCHITECTURE.md.
const PINNED: u64 = if BUDGET < CLIENTS as u64 * SHARE {
    BUDGET
} else {
    CLIENTS as u64 * SHARE
};
/// What else each visitor connection may cost the gateway, whatever it reads: TLS session and
/// buffers, hyper's connection state, tasks (measured at ~100 KiB in a debug build).
const PER_CONNECTION: u64 = 192 * KIB;
/// Allocator slack on top of the resting process (glibc keeps freed memory in its arenas).
const SLACK: u64 = 16 * MIB;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The `i`th client address of a test (`127.0.0.base+i`).
fn source(base: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, base + (i % CLIENTS as usize) as u8)
}

/// A TLS connection to the gateway from `source`, offering `alpn`, with a small receive buffer
/// so that a visitor who reads nothing stops the gateway's writes soon.
async fn tls_from(
    ca_der: &Path,
    port: u16,
    source: Ipv4Addr,
    host: &str,
    alpn: &[u8],
) -> TlsStream<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let config = client_config(ca_der, vec![alpn.to_vec()]);
    let name = ServerName::try_from(host.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the gateway")
}

/// An h2 client connection with a stream window of `window` bytes: it never opens it further
/// unless a body is read.
async fn h2_from(
    env: &TestEnv,
    port: u16,
    source: Ipv4Addr,
    host: &str,
    window: u32,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tls = tls_from(&env.pki.ca_der, port, source, host, b"h2").await;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .handshake(TokioIo::new(tls))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

fn get(host: &str, port: u16, path: &str) -> Request<Empty<Bytes>> {
    let uri = format!("https://{host}:{port}{path}");
    Request::get(uri).body(Empty::new()).unwrap()
}

/// A gateway with an HTTP tunnel `app` to the harness backend; returns the tunnel host.
fn gateway_with_tunnel(env: &TestEnv, limits: &[(&str, toml::Value)]) -> (Gateway, Proc, String) {
    let config = limits
        .iter()
        .fold(env.gateway(), |c, (key, value)| c.limit(key, value.clone()));
    let gw = config.start();
    let key = env.key("a", KeyKind::Ed25519);
    let tunnel = gw
        .ssh(&key, Transport::Tls)
        .open_tunnel("app", 80, http_backend("alpha"));
    (gw, tunnel, key.host("app"))
}

fn budget_limits() -> Vec<(&'static str, toml::Value)> {
    vec![
        ("tunnel_buffer_budget", (BUDGET as i64).into()),
        ("client_buffer_share", (SHARE as i64).into()),
        ("write_idle_timeout", format!("{}s", WRITE_IDLE.as_secs()).into()),
    ]
}

/// What one stalled-visitors run measured.
struct Measured {
    idle_kib: u64,
    peak_kib: u64,
    after_kib: u64,
    peak_reserved: f64,
    served_in: Duration,
    cut_after: Duration,
}

/// Holds `stall` (which sets up the stalled visitors and returns them) while a normal visitor is
/// served, until the gateway has cut `VISITORS` responses for `protocol`; measures RSS throughout.
fn measure<T>(
    env: &TestEnv,
    gw: &Gateway,
    host: &str,
    protocol: &str,
    curl_flag: &str,
    stall: impl FnOnce() -> T,
) -> (Measured, T) {
    let (visitor, admin) = (Visitor::new(env, gw), Admin::new(gw, None));
    // Warm up (one request through the tunnel), then the resting figure.
    visitor.get(host, "/", &[]).expect_status(200, "warm-up");
    let idle_kib = rss_kib(gw.pid()).unwrap();
    let sampler = RssSampler::start(gw.pid());
    let started = Instant::now();
    let held = stall();
    let reserved = || admin.scrape().count("edgemux_tunnel_buffer_reserved_bytes", &[]);
    let mut peak_reserved = 0f64;
    // Let the stalled responses fill what they may, then serve a normal visitor beside them.
    poll_until(Duration::from_secs(2), || {
        peak_reserved = peak_reserved.max(reserved());
        None::<()>
    });
    let served = Instant::now();
    let path = format!("/bytes/{MIB}");
    let got = visitor.get(host, &path, &[curl_flag, "--interface", "127.0.0.9"]);
    let served_in = served.elapsed();
    got.expect_status(200, "a normal visitor beside the stalled ones");
    assert!(
        got.body == pattern(MIB),
        "the normal visitor's body differs: {got:?}"
    );
    let cuts = || {
        admin
            .scrape()
            .count("edgemux_http_responses_cut_total", &[("protocol", protocol)])
    };
    let all_cut = poll_until(WRITE_IDLE * 6, || {
        peak_reserved = peak_reserved.max(reserved());
        (cuts() >= VISITORS as f64).then_some(())
    });
    let cut_after = started.elapsed();
    let (peak_kib, _) = sampler.peak();
    assert!(all_cut.is_some(), "{} of {VISITORS} responses cut", cuts());
    let freed = poll_until(SETUP, || (reserved() == 0.0).then_some(()));
    assert!(
        freed.is_some(),
        "{} bytes still reserved after the cut",
        reserved()
    );
    let after_kib = rss_kib(gw.pid()).unwrap();
    let m = Measured {
        idle_kib,
        peak_kib,
        after_kib,
        peak_reserved,
        served_in,
        cut_after,
    };
    (m, held)
}

/// Prints the figures and asserts the bound: the resting process, plus what the formula lets the
/// stalled clients pin, plus the per-connection state of `connections` visitor connections.
fn check(what: &str, m: &Measured, connections: u64) {
    let bound_kib = m.idle_kib + (PINNED + connections * PER_CONNECTION + SLACK) / KIB;
    println!(
        "{what}: gateway RSS idle {} KiB, peak {} KiB under {VISITORS} stalled visitors \
         (bound {bound_kib} KiB: min(budget {} MiB, {CLIENTS} clients x share {} MiB) + \
         {connections} connections x {} KiB + {} MiB slack), {} KiB after the cut; budget \
         reserved at most {} KiB; normal visitor served in {:?}; all cut {:?} after the start",
        m.idle_kib,
        m.peak_kib,
        BUDGET / MIB,
        SHARE / MIB,
        PER_CONNECTION / KIB,
        SLACK / MIB,
        m.after_kib,
        m.peak_reserved as u64 / KIB,
        m.served_in,
        m.cut_after,
    );
    assert!(
        m.peak_reserved <= PINNED as f64,
        "reserved {} > {PINNED}",
        m.peak_reserved
    );
    assert!(
        m.peak_kib <= bound_kib,
        "{what}: RSS peaked at {} KiB, bound {bound_kib} KiB",
        m.peak_kib
    );
    assert!(
        m.served_in < Duration::from_secs(10),
        "normal visitor took {:?}",
        m.served_in
    );
}

#[test]
fn stalled_http1_visitors_pin_at_most_their_shares_and_are_cut_at_write_idle_timeout() {
    let env = TestEnv::new();
    let (gw, _tunnel, host) = gateway_with_tunnel(&env, &budget_limits());
    let rt = runtime();
    let (m, mut held) = measure(&env, &gw, &host, "http/1.1", "--http1.1", || {
        rt.block_on(async {
            let mut held = Vec::new();
            for i in 0..VISITORS {
                let ca = &env.pki.ca_der;
                let mut tls = tls_from(ca, gw.port(), source(50, i), &host, b"http/1.1").await;
                let req = format!("GET /bytes/{BODY} HTTP/1.1\r\nHost: {host}\r\n\r\n");
                tls.write_all(req.as_bytes()).await.unwrap();
                held.push(tls);
            }
            held
        })
    });
    check("HTTP/1.1", &m, VISITORS as u64 + 1);
    // Each was cut: reading drains what the kernel held, then the connection ends.
    let ended = rt.block_on(async {
        let mut ended = 0;
        for tls in &mut held {
            let drain = async {
                let (mut buf, mut got) = (vec![0u8; 64 * 1024], 0u64);
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    got += n as u64;
                }
                got
            };
            if let Ok(got) = tokio::time::timeout(SETUP, drain).await {
                assert!(got < BODY, "a cut response arrived whole");
                ended += 1;
            }
        }
        ended
    });
    assert_eq!(ended, VISITORS, "connections still open after the cut");
}

#[test]
fn stalled_h2_streams_pin_at_most_their_shares_and_are_reset_at_write_idle_timeout() {
    /// 8 connections of 8 streams, each stream window 1 byte.
    const CONNECTIONS: usize = 8;
    let env = TestEnv::new();
    let (gw, _tunnel, host) = gateway_with_tunnel(&env, &budget_limits());
    let rt = runtime();
    let (m, held) = measure(&env, &gw, &host, "h2", "--http2", || {
        rt.block_on(async {
            let mut held: Vec<Response<Incoming>> = Vec::new();
            for c in 0..CONNECTIONS {
                let mut h2 = h2_from(&env, gw.port(), source(50, c), &host, 1).await;
                let path = format!("/bytes/{BODY}");
                let sent: Vec<_> = (0..VISITORS / CONNECTIONS)
                    .map(|_| h2.send_request(get(&host, gw.port(), &path)))
                    .collect();
                for response in sent {
                    let response = response.await.expect("response head");
                    assert_eq!(response.status(), 200);
                    held.push(response);
                }
            }
            held
        })
    });
    check("h2", &m, CONNECTIONS as u64 + 1);
    // Each stream was reset: its body ends in an error, not with the whole 64 MiB.
    let reset = rt.block_on(async {
        let mut reset = 0;
        for response in held {
            let mut body = response.into_body();
            let drain = async {
                loop {
                    match body.frame().await {
                        Some(Ok(_)) => {}
                        Some(Err(_)) => return true,
                        None => return false,
                    }
                }
            };
            if tokio::time::timeout(SETUP, drain).await == Ok(true) {
                reset += 1;
            }
        }
        reset
    });
    assert_eq!(reset, VISITORS, "streams not reset after the cut");
}

/// Reads until the peer closes (or `limit`); returns the bytes and when it closed.
async fn until_closed<S: tokio::io::AsyncRead + Unpin>(
    mut s: S,
    limit: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let (started, mut got, mut buf) = (Instant::now(), Vec::new(), [0u8; 4096]);
    loop {
        let deadline = tokio::time::Instant::from_std(started + limit);
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => got.extend_from_slice(&buf[..n]),
            Ok(_) => return (got, Some(started.elapsed())),
            Err(_) => return (got, None),
        }
    }
}

/// The client connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Whether `bytes` (what an h2 server sent) hold a GOAWAY frame.
fn has_goaway(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes[3] == 0x7 {
            return true;
        }
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    false
}

#[test]
fn silent_h2_connections_close_at_header_timeout_and_h2c_is_refused() {
    const SILENT: usize = 16;
    let header_timeout = Duration::from_secs(2);
    let env = TestEnv::new();
    let gw = env.gateway().limit("header_timeout", "2s").start();
    let (visitor, port) = (Visitor::new(&env, &gw), gw.port());
    let rt = runtime();
    let limit = Duration::from_secs(15);
    let (silent, preface_only, h2c) = rt.block_on(async {
        let ca = &env.pki.ca_der;
        let lo = Ipv4Addr::LOCALHOST;
        // After the TLS handshake (ALPN h2): nothing at all, or the preface and no stream.
        let mut silent = Vec::new();
        for _ in 0..SILENT {
            let tls = tls_from(ca, port, lo, DOMAIN, b"h2").await;
            silent.push(tokio::spawn(until_closed(tls, limit)));
        }
        let mut tls = tls_from(ca, port, lo, DOMAIN, b"h2").await;
        tls.write_all(H2_PREFACE).await.unwrap();
        let preface_only = tokio::spawn(until_closed(tls, limit));
        // Cleartext h2 (prior knowledge) on the plain port.
        let mut plain = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        plain.write_all(H2_PREFACE).await.unwrap();
        let h2c = tokio::spawn(until_closed(plain, limit));
        (silent, preface_only, h2c)
    });
    // While they are held, another client is served at once.
    let started = Instant::now();
    let got = visitor.get(DOMAIN, "/healthz", &["--http2"]);
    let served_in = started.elapsed();
    got.expect_status(200, "beside silent h2 connections");
    assert_eq!(got.version, "2");
    let (silent, preface_only, h2c) = rt.block_on(async {
        let mut closed = Vec::new();
        for s in silent {
            closed.push(s.await.unwrap());
        }
        (closed, preface_only.await.unwrap(), h2c.await.unwrap())
    });
    let on_time = |c: Option<Duration>| {
        c.is_some_and(|c| {
            c + Duration::from_millis(50) >= header_timeout && c < header_timeout + Duration::from_secs(4)
        })
    };
    let silent_closed: Vec<Option<Duration>> = silent.iter().map(|(_, c)| *c).collect();
    println!(
        "header_timeout {header_timeout:?}: {SILENT} silent ALPN-h2 connections closed after \
         {silent_closed:?}; preface-only h2 closed after {:?} (GOAWAY: {}); h2c preface \
         refused after {:?} with {:?}; a new client served in {served_in:?}",
        preface_only.1,
        has_goaway(&preface_only.0),
        h2c.1,
        String::from_utf8_lossy(&h2c.0[..h2c.0.len().min(40)]),
    );
    assert!(
        served_in < Duration::from_secs(2),
        "a new client waited {served_in:?}"
    );
    for (got, closed) in &silent {
        assert!(
            on_time(*closed),
            "silent h2 closed after {closed:?}, sent {got:?}"
        );
    }
    assert!(
        on_time(preface_only.1),
        "preface-only h2 closed after {:?}",
        preface_only.1
    );
    assert!(
        has_goaway(&preface_only.0),
        "no GOAWAY before the close: {:?}",
        preface_only.0
    );
    // Refused at once, in HTTP/1.1 (400) or by a close; never h2 (which starts with SETTINGS).
    let http1 = h2c.0.is_empty() || h2c.0.starts_with(b"HTTP/1.1 400 ");
    let refused = h2c.1.is_some_and(|c| c < Duration::from_secs(1)) && http1;
    assert!(refused, "h2c: closed after {:?}, sent {:?}", h2c.1, h2c.0);
}

#[test]
fn one_visitor_holding_unread_streams_leaves_channels_for_another() {
    let env = TestEnv::new();
    let limits = [("channels_per_tunnel", toml::Value::from(4))];
    let (gw, _tunnel, host) = gateway_with_tunnel(&env, &limits);
    let (visitor, admin, port) = (Visitor::new(&env, &gw), Admin::new(&gw, None), gw.port());
    let rt = runtime();
    let path = format!("/bytes/{BODY}");
    let a = Ipv4Addr::new(127, 0, 0, 61);
    // Visitor A asks for four bodies on one h2 connection and reads none of them.
    let (held, statuses) = rt.block_on(async {
        let mut h2 = h2_from(&env, port, a, &host, 1).await;
        let sent: Vec<_> = (0..4).map(|_| h2.send_request(get(&host, port, &path))).collect();
        let mut held = Vec::new();
        for response in sent {
            held.push(response.await.expect("a response head"));
        }
        let statuses: Vec<u16> = held.iter().map(|r| r.status().as_u16()).collect();
        (held, statuses)
    });
    let mut sorted = statuses.clone();
    sorted.sort();
    // A second connection of A's is still A.
    let again = rt.block_on(async {
        let mut h2 = h2_from(&env, port, a, &host, 1).await;
        h2.send_request(get(&host, port, &path))
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    // Visitor B, from another address, over both protocols.
    let b: Vec<u16> = ["--http1.1", "--http2"]
        .iter()
        .map(|flag| {
            let got = visitor.get(
                &host,
                &format!("/bytes/{MIB}"),
                &[flag, "--interface", "127.0.0.62"],
            );
            assert!(got.status != 200 || got.body == pattern(MIB), "{flag}: {got:?}");
            got.status
        })
        .collect();
    let refused = admin
        .scrape()
        .count("edgemux_forwarded_channels_total", &[("result", "visitor_share")]);
    println!(
        "channels_per_tunnel 4: visitor A's four unread streams got {statuses:?}, a fifth on \
         another connection {again}; visitor B got {b:?}; channels refused for A's share: {refused}"
    );
    assert_eq!(sorted, [200, 200, 502, 502], "A holds half the channels, no more");
    assert_eq!(again, 502, "A's share counts across its connections");
    assert_eq!(b, [200, 200], "B is served beside A's unread streams");
    assert!(refused >= 3.0, "refusals counted: {refused}");
    drop(held);
}
