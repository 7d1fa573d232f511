//! The HTTPS reverse proxy end to end: `curl` (HTTP/1.1 and h2) and a WebSocket client as visitors,
//! the real `ssh -R` over `openssl s_client` as the tunnel, a hyper backend behind it. Bodies must
//! arrive byte for byte, stream with bounded gateway memory, carry the forwarding headers, fail with
//! the right status, spread over a pool and survive losing a member.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::backend::random_bytes;
use common::http::{http_backend, pattern, pattern_sha256};
use common::http::{rss_kib, tls_connect, RssSampler, Visitor};
use common::process::{poll_until, Proc};
use common::ssh::{KeyKind, SshClient, SshKey, Transport};
use common::{Gateway, TestEnv, DOMAIN, SETUP};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1 << 20;

/// A gateway with one HTTP tunnel `app` to a backend whose id is `alpha`.
struct Site {
    tunnel: Proc,
    client: SshClient,
    key: SshKey,
    gw: Gateway,
    visitor: Visitor,
    host: String,
    env: TestEnv,
}

/// `limits` are `[limits]` keys with their values, e.g. `("upstream_timeout", "1s")`.
fn site(limits: &[(&str, &str)]) -> Site {
    let env = TestEnv::new();
    let config = limits
        .iter()
        .fold(env.gateway(), |config, &(key, value)| config.limit(key, value));
    let gw = config.start();
    let key = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let tunnel = client.open_tunnel("app", 80, http_backend("alpha"));
    let (visitor, host) = (Visitor::new(&env, &gw), key.host("app"));
    Site {
        tunnel,
        client,
        key,
        gw,
        visitor,
        host,
        env,
    }
}

#[test]
fn get_and_post_1mib_byte_for_byte_over_http1_and_h2() {
    let s = site(&[]);
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let got = s.visitor.get(&s.host, &format!("/bytes/{MIB}"), &[flag]);
        got.expect_status(200, flag);
        assert_eq!(got.version, version, "GET {flag}");
        assert!(
            got.body == pattern(MIB),
            "GET {flag}: body differs from the backend's: {got:?}"
        );

        let sent = random_bytes(MIB as usize);
        let file = s.visitor.file("post");
        std::fs::write(&file, &sent).unwrap();
        let data = format!("@{}", file.display());
        let got = s.visitor.get(&s.host, "/echo", &[flag, "--data-binary", &data]);
        got.expect_status(200, flag);
        assert_eq!(got.version, version, "POST {flag}");
        assert!(
            got.body == sent,
            "POST {flag}: echo differs from the 1 MiB sent: {got:?}"
        );
    }
}

/// Peak gateway RSS allowed while 256 MiB move each way. Per transfer the gateway may hold one
/// channel buffer (`ssh.channel_buffer`, 4 MiB; past it the channel is closed), an SSH window (a few
/// MiB) and hyper/TLS buffers (under 1 MiB), on top of a resting process of ~25 MiB (debug build)
/// and allocator slack. 96 MiB leaves room for all that and is far below the 256 MiB that storing a
/// body, or a buffer that grows with it, would take.
const RSS_BOUND_KIB: u64 = 96 * 1024;

#[test]
fn large_download_and_upload_stream_with_bounded_gateway_memory() {
    const LEN: u64 = 256 * MIB;
    const LIMIT: Duration = Duration::from_secs(170);
    let s = site(&[]);
    let resting = rss_kib(s.gw.pid()).expect("gateway RSS");
    let sampler = RssSampler::start(s.gw.pid());

    let started = Instant::now();
    let (curl, hash) = s
        .visitor
        .download_sha256(&s.host, &format!("/bytes/{LEN}"), LIMIT);
    let down_time = started.elapsed();
    assert_eq!(curl, format!("200 {LEN}"), "download status and size");
    assert_eq!(hash, pattern_sha256(LEN), "hash of the download");

    let started = Instant::now();
    let (status, body) = s.visitor.upload_pattern(&s.host, "/upload", LEN, LIMIT);
    let up_time = started.elapsed();
    assert_eq!(status, 200, "upload status: {body}");
    let reply: Value = serde_json::from_str(&body).expect("upload reply is JSON");
    assert_eq!(reply["len"], LEN, "bytes the backend received: {reply}");
    assert_eq!(
        reply["sha256"],
        pattern_sha256(LEN),
        "hash of what the backend received"
    );

    let (peak, samples) = sampler.peak();
    eprintln!(
        "256 MiB down in {down_time:?}, up in {up_time:?}; gateway RSS resting {resting} KiB, \
         peak {peak} KiB over {samples} samples"
    );
    assert!(samples >= 5, "too few RSS samples ({samples}) to say anything");
    assert!(
        peak < RSS_BOUND_KIB,
        "gateway RSS peaked at {peak} KiB (bound {RSS_BOUND_KIB})"
    );
}

/// The values of a header in the backend's `/headers` JSON, joined as one field value.
fn header(json: &Value, name: &str) -> Option<String> {
    let values: Vec<&str> = json[name].as_array()?.iter().filter_map(Value::as_str).collect();
    Some(values.join(", "))
}

/// What a visitor might claim about where it comes from, as curl arguments.
const FORGED: [&str; 12] = [
    "-H",
    "X-Forwarded-For: 203.0.113.9",
    "-H",
    "Forwarded: for=203.0.113.9;proto=http",
    "-H",
    "X-Real-IP: 203.0.113.9",
    "-H",
    "X-Forwarded-Proto: http",
    "-H",
    "X-Forwarded-Host: evil.example",
    "-H",
    "X-Forwarded-Port: 80",
];

#[test]
fn backend_receives_forwarding_headers_and_no_hop_by_hop_ones() {
    let s = site(&[]);
    let port = s.gw.port();
    let hop = [
        "-H",
        "Connection: keep-alive, X-Secret",
        "-H",
        "X-Secret: 1",
        "-H",
        "Keep-Alive: 5",
    ];
    for (flag, extra) in [("--http1.1", &hop[..]), ("--http2", &[][..])] {
        let mut args = vec![flag];
        args.extend(FORGED);
        args.extend(extra);
        let got = s.visitor.get(&s.host, "/headers", &args);
        let json: Value = serde_json::from_slice(&got.expect_status(200, flag).body).expect("JSON");
        // Only what the gateway knows: the visitor's own forwarding headers never arrive.
        let want = [
            ("x-forwarded-for", "127.0.0.1".to_owned()),
            ("x-real-ip", "127.0.0.1".to_owned()),
            ("x-forwarded-proto", "https".to_owned()),
            ("x-forwarded-host", s.host.clone()),
            ("x-forwarded-port", port.to_string()),
            ("forwarded", format!("for=127.0.0.1;host={};proto=https", s.host)),
            ("host", format!("{}:{port}", s.host)),
        ];
        for (name, value) in want {
            assert_eq!(header(&json, name), Some(value), "{flag}: {name} in {json}");
        }
        assert!(
            !json.to_string().contains("203.0.113.9"),
            "{flag}: forged address passed: {json}"
        );
        for name in [
            "x-secret",
            "keep-alive",
            "connection",
            "te",
            "transfer-encoding",
            "upgrade",
        ] {
            assert_eq!(
                header(&json, name),
                None,
                "{flag}: hop-by-hop {name} passed: {json}"
            );
        }
    }
}

#[test]
fn a_trusted_forwarders_headers_are_kept_and_the_sender_appended() {
    let env = TestEnv::new();
    let gw = env
        .gateway()
        .set("http.trusted_forwarders", vec!["127.0.0.0/8"])
        .start();
    let key = env.key("a", KeyKind::Ed25519);
    let _tunnel = gw
        .ssh(&key, Transport::Tls)
        .open_tunnel("app", 80, http_backend("alpha"));
    let (visitor, host) = (Visitor::new(&env, &gw), key.host("app"));
    let mut args = vec!["--http2"];
    args.extend(FORGED);
    let got = visitor.get(&host, "/headers", &args);
    let json: Value = serde_json::from_slice(&got.expect_status(200, "trusted").body).expect("JSON");
    let want = [
        ("x-forwarded-for", "203.0.113.9, 127.0.0.1".to_owned()),
        (
            "forwarded",
            format!("for=203.0.113.9;proto=http, for=127.0.0.1;host={host};proto=https"),
        ),
        ("x-real-ip", "203.0.113.9".to_owned()),
        ("x-forwarded-proto", "http".to_owned()),
        ("x-forwarded-host", "evil.example".to_owned()),
        ("x-forwarded-port", "80".to_owned()),
    ];
    for (name, value) in want {
        assert_eq!(header(&json, name), Some(value), "{name} in {json}");
    }
}

#[test]
fn unknown_host_is_404_closed_backend_is_502_and_apex_healthz_is_200() {
    let s = site(&[]);
    let unknown = format!("nobody-aaaaaaaa.{DOMAIN}");
    let got = s.visitor.get(&unknown, "/", &[]);
    got.expect_status(404, "unknown host");
    assert!(
        got.text().starts_with(
            "no tunnel nobody-aaaaaaaa is connected\nstart it with: ssh -R nobody:80:localhost:3000 gw.test"
        ),
        "404 body does not name the tunnel and how to start it: {got:?}"
    );

    // A tunnel whose ssh client forwards to a port nothing listens on (bound, then released).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _gone = s.client.open_tunnel("gone", 80, closed);
    let started = Instant::now();
    s.visitor
        .get(&s.key.host("gone"), "/", &[])
        .expect_status(502, "closed backend port");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "502 took {:?}",
        started.elapsed()
    );

    let got = s.visitor.get(DOMAIN, "/healthz", &[]);
    assert_eq!(
        got.expect_status(200, "apex /healthz").text().trim(),
        "ok",
        "{got:?}"
    );
}

#[test]
fn slow_backend_is_504_and_frozen_tunnel_client_is_502_or_504() {
    // The harness's keepalives (1 s × 2) drop a frozen client after 2-3 s, which would turn the
    // answer into a 404; with 1 s timeouts the gateway answers before that.
    let s = site(&[("tunnel_open_timeout", "1s"), ("upstream_timeout", "1s")]);
    let started = Instant::now();
    s.visitor
        .get(&s.host, "/sleep/5000", &[])
        .expect_status(504, "backend sleeping 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "504 took {:?}",
        started.elapsed()
    );

    let warm = s.visitor.get(&s.host, "/", &[]);
    assert_eq!(warm.expect_status(200, "before the freeze").text(), "alpha");
    s.tunnel.freeze();
    let started = Instant::now();
    let got = s.visitor.get(&s.host, "/", &[]);
    let took = started.elapsed();
    // 502: the channel open timed out (a new upstream connection); 504: a kept-alive upstream
    // connection took the request and no response came within `upstream_timeout`.
    eprintln!("frozen tunnel client: {} after {took:?}", got.status);
    assert!(
        [502, 504].contains(&got.status),
        "frozen client, after {took:?}: {got:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "gave up before the 1 s timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?} with 1 s timeouts");
}

#[test]
fn websocket_echoes_both_ways_through_the_gateway() {
    let s = site(&[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let session = async {
        let tls = tls_connect(&s.env.pki.ca_der, s.gw.port(), &s.host, &[b"http/1.1"]).await;
        let url = format!("wss://{}:{}/ws", s.host, s.gw.port());
        let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("handshake");
        assert_eq!(resp.status(), 101);
        let binary = random_bytes(256 * 1024);
        for msg in [Message::text("hello through the tunnel"), Message::binary(binary)] {
            ws.send(msg.clone()).await.expect("send");
            let echoed = ws.next().await.expect("an echo").expect("a message");
            assert!(
                echoed == msg,
                "echo differs ({} vs {} bytes)",
                echoed.len(),
                msg.len()
            );
        }
        ws.close(None).await.expect("close");
    };
    rt.block_on(async {
        tokio::time::timeout(SETUP, session)
            .await
            .expect("WebSocket timed out")
    });
}

#[test]
fn pool_spreads_requests_and_survives_losing_a_member() {
    /// After the kill, requests may fail only this long (the gateway has to see the dead member).
    const SETTLE: Duration = Duration::from_secs(2);
    let s = site(&[]);
    let two = s
        .client
        .remote_forward(&format!("app:80:127.0.0.1:{}", http_backend("two")));
    let reach = || s.visitor.get(&s.host, "/id", &[]).text();

    // Nothing tells us when the second member has joined, so ask until it answers (bounded).
    let joined = poll_until(SETUP, || (reach() == "two").then_some(()));
    assert!(joined.is_some(), "member two never served\n{}", two.describe());
    let next: Vec<String> = (0..6).map(|_| reach()).collect();
    for pair in next.windows(2) {
        let spread = pair[0] != pair[1] && ["alpha", "two"].contains(&&*pair[0]);
        assert!(spread, "not round-robin: {next:?}");
    }

    // A loop of requests runs while member two is killed (ssh and its openssl, SIGKILL). Times
    // are milliseconds since `t0`.
    let (t0, log) = (Instant::now(), Mutex::new(Vec::<(i64, i64, u16, String)>::new()));
    let (stop, ms) = (AtomicBool::new(false), || t0.elapsed().as_millis() as i64);
    let count_since = |from: i64| log.lock().unwrap().iter().filter(|(t, ..)| *t >= from).count();
    let killed = thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let started = ms();
                let got = s.visitor.get(&s.host, "/id", &[]);
                log.lock().unwrap().push((started, ms(), got.status, got.text()));
            }
        });
        poll_until(SETUP, || (count_since(0) >= 3).then_some(()));
        drop(two);
        let killed = ms();
        let settled = killed + SETTLE.as_millis() as i64;
        poll_until(SETUP, || (count_since(settled) >= 5).then_some(()));
        stop.store(true, Ordering::Relaxed);
        killed
    });

    let log = log.into_inner().unwrap();
    let all: Vec<String> = log
        .iter()
        .map(|(t, end, s, body)| format!("{}..{}ms:{s}:{body}", t - killed, end - killed))
        .collect();
    eprintln!("{} requests around the kill (at 0 ms): {all:?}", log.len());
    let before: Vec<_> = log.iter().filter(|(_, end, ..)| *end < killed).collect();
    // A request already sent to the member that dies is not replayed (it may have had effects):
    // it may fail, but with a 502 and promptly, never by hanging.
    let in_flight: Vec<_> = log
        .iter()
        .filter(|(t, end, ..)| *t < killed && *end >= killed)
        .collect();
    let after: Vec<_> = log
        .iter()
        .filter(|(t, ..)| *t >= killed + SETTLE.as_millis() as i64)
        .collect();
    let enough = before.len() >= 3 && after.len() >= 5;
    assert!(enough, "too few requests around the kill: {all:?}");
    assert!(
        before.iter().all(|(_, _, s, _)| *s == 200),
        "failures before the kill: {all:?}"
    );
    assert!(
        in_flight
            .iter()
            .all(|(t, end, s, _)| [200, 502].contains(s) && end - t < 5_000),
        "a request in flight at the kill hung or got neither 200 nor 502: {all:?}"
    );
    let survivor = |(_, _, s, body): &&(i64, i64, u16, String)| *s == 200 && body == "alpha";
    assert!(
        after.iter().all(survivor),
        "{SETTLE:?} after the kill all must reach alpha: {all:?}"
    );
}

/// A visitor that reads steadily but slower than the tunnel delivers (2 MiB/s, a broadband rate)
/// must still get the whole body: streaming should mean back-pressure, not a cut-off download.
#[test]
fn visitor_slower_than_the_tunnel_still_receives_the_whole_body() {
    const LEN: u64 = 16 * MIB;
    let s = site(&[]);
    for flag in ["--http1.1", "--http2"] {
        let got = s
            .visitor
            .get(&s.host, &format!("/bytes/{LEN}"), &[flag, "--limit-rate", "2M"]);
        let whole = got.status == 200 && got.body == pattern(LEN);
        assert!(whole, "{flag}: not the whole {LEN} bytes at 2 MiB/s: {got:?}");
    }
}

#[test]
fn plain_http_redirects_to_https_except_acme_challenges() {
    let s = site(&[]);
    let port = s.gw.port();
    let plain = |path: &str| {
        let url = format!("http://127.0.0.1:{port}{path}");
        s.visitor.fetch("a.gw.test", &url, &["-H", "Host: a.gw.test"])
    };
    let got = plain("/x?y=1");
    let location = got.expect_status(308, "plain HTTP").header("location");
    assert_eq!(
        location,
        Some(format!("https://a.gw.test:{port}/x?y=1")),
        "{got:?}"
    );

    let got = plain("/.well-known/acme-challenge/some-token");
    let location = got.expect_status(404, "ACME challenge").header("location");
    assert_eq!(location, None, "an ACME challenge was redirected: {got:?}");
}

/// A reader at 32 KiB/s of a 256 MiB body beside a second request on the same tunnel (same SSH
/// connection). The gateway's defence is to close the slow channel once it is `channel_buffer`
/// behind, which may happen before or during the second request; what is asserted is the bound on
/// the second request while the slow download is still running.
#[test]
fn slow_downloader_does_not_slow_another_request_on_the_tunnel() {
    let s = site(&[]);
    let file = s.visitor.file("slow");
    let (url, out) = (
        s.visitor.url(&s.host, &format!("/bytes/{}", 256 * MIB)),
        file.display().to_string(),
    );
    let mut slow = s
        .visitor
        .spawn(&s.host, SETUP * 3, &["--limit-rate", "32k", "-o", &out, &url]);
    let started = poll_until(SETUP, || std::fs::metadata(&file).ok().filter(|m| m.len() > 0));
    assert!(
        started.is_some(),
        "the slow download never started\n{}",
        slow.describe()
    );

    let begin = Instant::now();
    let got = s.visitor.get(&s.host, &format!("/bytes/{MIB}"), &[]);
    let took = begin.elapsed();
    got.expect_status(200, "beside a slow reader");
    assert!(got.body == pattern(MIB), "the second download differs: {got:?}");
    assert!(
        took < Duration::from_secs(5),
        "the second request took {took:?} beside a slow reader"
    );
    assert!(
        slow.try_wait().is_none(),
        "the slow download ended early\n{}",
        slow.describe()
    );
}
