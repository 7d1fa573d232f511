//! Hardening end to end, against the real binary: floods of silent connections, stalled and
//! slowloris clients, the per-address cap, slowed and counted SSH key refusals, a graceful SIGTERM
//! drain under 256 MiB downloads, and SIGHUP reloads (a swapped certificate, a rejected config).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::backend::read_up_to;
use common::flood::{ensure_open_files, Ended, Flood};
use common::http::{http_backend, pattern_sha256, tls_connect, Visitor};
use common::pki::{self, Leaf};
use common::process::{poll_until, run_bounded, send_signal, Proc};
use common::prom::Admin;
use common::ssh::{KeyKind, SshKey, Transport};
use common::{Gateway, TestEnv, DOMAIN, SETUP};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MIB: u64 = 1 << 20;
/// Timers never fire early; this only absorbs the clock reads on both sides.
const EARLY: Duration = Duration::from_millis(50);

fn runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().build().unwrap()
}

/// `edgemux_connections_active`, summed over routes (pending, ssh, http).
fn active(admin: &Admin) -> f64 {
    admin.scrape().count("edgemux_connections_active", &[])
}

/// Reads until the peer closes or `timeout`; returns what arrived and, if it closed, when.
fn read_until_closed(mut tcp: TcpStream, timeout: Duration) -> (Vec<u8>, Option<Duration>) {
    let (started, mut got, mut buf) = (Instant::now(), Vec::new(), [0u8; 4096]);
    while let Some(left) = timeout.checked_sub(started.elapsed()).filter(|l| !l.is_zero()) {
        tcp.set_read_timeout(Some(left)).unwrap();
        match tcp.read(&mut buf) {
            Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Ok(0) | Err(_) => return (got, Some(started.elapsed())),
        }
    }
    (got, None)
}

/// Asserts that every flood connection was sent bytes starting with `head` (an empty `head`:
/// nothing at all) and closed `after` connecting (up to `slack` later).
fn assert_closed_at(ended: &[Ended], head: &[u8], after: Duration, slack: Duration) {
    let on_time = |e: &Ended| {
        e.lifetime()
            .is_some_and(|l| l + EARLY >= after && l <= after + slack)
    };
    let wrong: Vec<&Ended> = ended
        .iter()
        .filter(|e| !on_time(e) || !e.head.starts_with(head) || e.head.is_empty() != head.is_empty())
        .collect();
    let (n, total, shown) = (wrong.len(), ended.len(), &wrong[..wrong.len().min(3)]);
    let head = String::from_utf8_lossy(head);
    assert!(
        n == 0,
        "{n} of {total} not sent {head:?} and closed {after:?} (+{slack:?}) in: {shown:?}"
    );
}

/// 1,000 flood connections: 250 from each of four addresses, under the default
/// `max_connections_per_client` (256), so that cap refuses none of them.
const FLOOD_SOURCES: [Ipv4Addr; 4] = [
    Ipv4Addr::new(127, 0, 0, 10),
    Ipv4Addr::new(127, 0, 0, 11),
    Ipv4Addr::new(127, 0, 0, 12),
    Ipv4Addr::new(127, 0, 0, 13),
];
const FLOOD_PER_SOURCE: usize = 250;

#[test]
fn a_thousand_silent_connections_neither_block_a_new_client_nor_outlive_their_deadline() {
    let total = FLOOD_SOURCES.len() * FLOOD_PER_SOURCE;
    ensure_open_files(total as u64 + 512);
    let env = TestEnv::new();
    // A silent peer is routed to SSH at `sniff` (it gets the banner), and cut `login` after that.
    let (sniff, login) = (Duration::from_secs(1), Duration::from_secs(5));
    let gw = env
        .gateway()
        .limit("sniff_timeout", "1s")
        .limit("login_timeout", "5s")
        .limit("pre_routing_timeout", "3s")
        .start();
    let key = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let _tunnel = client.open_tunnel("app", 80, http_backend("alpha"));
    let (visitor, host, admin) = (Visitor::new(&env, &gw), key.host("app"), Admin::new(&gw, None));
    let baseline = active(&admin);

    let limit = sniff + login + SETUP;
    let flood = Flood::start(gw.port(), &FLOOD_SOURCES, FLOOD_PER_SOURCE, b"", limit);
    assert_eq!(flood.wait_connected(SETUP), total);
    let flooded = Instant::now();
    let got = visitor.get(&host, "/", &[]);
    let curl_took = flooded.elapsed();
    assert_eq!((got.status, got.text()), (200, "alpha".to_owned()), "{got:?}");
    let listed = client.find_tunnel("app").is_some();
    assert!(listed, "`ssh gw tunnels` lost the tunnel");
    let (served, served_at) = (flooded.elapsed(), Instant::now());
    let all_open = |a: &f64| *a >= baseline + total as f64;
    let peak = poll_until(Duration::from_secs(2), || Some(active(&admin)).filter(all_open));
    let peak = peak.unwrap_or_else(|| panic!("the gateway never held all {total} at once"));

    let ended = flood.finish();
    let lifetimes: Vec<Duration> = ended.iter().filter_map(Ended::lifetime).collect();
    let (first, last) = (lifetimes.iter().min(), lifetimes.iter().max());
    eprintln!(
        "flood of {total}: HTTPS through the tunnel in {curl_took:?}, ssh `tunnels` done {served:?} \
         after it; gauge {baseline} -> {peak}; flood closed after {first:?}..{last:?}"
    );
    assert!(curl_took < Duration::from_secs(5), "HTTPS took {curl_took:?}");
    let early = |e: &&Ended| e.closed.is_some_and(|c| c < served_at);
    let early = ended.iter().filter(early).count();
    assert_eq!(early, 0, "flood connections closed before the client was served");
    assert_closed_at(&ended, b"SSH-2.0-", sniff + login, Duration::from_secs(10));
    let settled = poll_until(SETUP, || (active(&admin) == baseline).then_some(()));
    assert!(settled.is_some(), "connections_active at {}", active(&admin));
}

#[test]
fn stalled_tls_handshakes_are_closed_silently_at_the_pre_routing_deadline() {
    // A ClientHello record announcing 512 bytes, of which only these ever arrive.
    const PARTIAL_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    let env = TestEnv::new();
    let gw = env
        .gateway()
        .limit("pre_routing_timeout", "2s")
        .limit("sniff_timeout", "1s")
        .start();
    let source = [Ipv4Addr::new(127, 0, 0, 20)];
    let flood = Flood::start(gw.port(), &source, 100, PARTIAL_HELLO, SETUP);
    assert_eq!(flood.wait_connected(SETUP), 100);
    let (deadline, slack) = (Duration::from_secs(2), Duration::from_secs(6));
    assert_closed_at(&flood.finish(), b"", deadline, slack);
}

/// Trickles `head`, then a byte every 300 ms, on `tls` until the gateway closes it; returns when
/// it was cut (`None`: not within 15 s) and the bytes sent.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S, head: &[u8]) -> (Option<Duration>, usize) {
    let (started, mut sent, mut buf) = (Instant::now(), 0, [0u8; 1024]);
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    while started.elapsed() < Duration::from_secs(15) {
        tokio::select! {
            r = tls.read(&mut buf) => match r {
                Ok(n @ 1..) => panic!("slowloris answered: {:?}", String::from_utf8_lossy(&buf[..n])),
                _ => return (Some(started.elapsed()), sent),
            },
            _ = tick.tick() => {
                let chunk = if sent == 0 { head } else { b"a" };
                if tls.write_all(chunk).await.and(tls.flush().await).is_err() {
                    return (Some(started.elapsed()), sent);
                }
                sent += chunk.len();
            }
        }
    }
    (None, sent)
}

#[test]
fn slowloris_headers_are_cut_at_header_timeout_while_another_client_is_served() {
    let header_timeout = Duration::from_secs(2);
    let env = TestEnv::new();
    let gw = env.gateway().limit("header_timeout", "2s").start();
    let visitor = Visitor::new(&env, &gw);
    let head = format!("GET /healthz HTTP/1.1\r\nHost: {DOMAIN}\r\nX-Slow: ");
    let (cut, sent) = thread::scope(|scope| {
        let slow = scope.spawn(|| {
            runtime().block_on(async {
                let tls = tls_connect(&env.pki.ca_der, gw.port(), DOMAIN, &[b"http/1.1"]).await;
                let (cut, sent) = trickle(tls, head.as_bytes()).await;
                (cut, sent, Instant::now())
            })
        });
        thread::sleep(Duration::from_millis(700));
        let got = visitor.get(DOMAIN, "/healthz", &[]);
        got.expect_status(200, "beside the slowloris");
        let served = Instant::now();
        let (cut, sent, cut_at) = slow.join().unwrap();
        assert!(served < cut_at, "the other client was served only after the cut");
        (cut, sent)
    });
    let cut = cut.unwrap_or_else(|| panic!("a slowloris ({sent} bytes sent) was never cut"));
    eprintln!("slowloris cut after {cut:?}, having sent {sent} bytes");
    let on_time = cut + EARLY >= header_timeout && cut < header_timeout + Duration::from_secs(4);
    assert!(on_time, "cut after {cut:?}; header_timeout is {header_timeout:?}");
    assert!(sent > head.len() + 3, "not trickling: {sent} bytes sent");
}

#[test]
fn tls_client_silent_after_the_handshake_is_cut_at_header_timeout() {
    let header_timeout = Duration::from_secs(2);
    let env = TestEnv::new();
    let gw = env.gateway().limit("header_timeout", "2s").start();
    let cut = runtime().block_on(async {
        let mut tls = tls_connect(&env.pki.ca_der, gw.port(), DOMAIN, &[b"http/1.1"]).await;
        let started = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(15), tls.read(&mut [0u8; 1024])).await;
        read.ok().map(|_| started.elapsed())
    });
    let cut = cut.unwrap_or_else(|| panic!("a TLS client (ALPN http/1.1) silent for 15 s was not cut"));
    let on_time = cut + EARLY >= header_timeout && cut < header_timeout + Duration::from_secs(4);
    assert!(on_time, "cut after {cut:?}; header_timeout is {header_timeout:?}");
}

#[test]
fn per_address_cap_refuses_the_excess_from_one_address_while_another_is_served() {
    let env = TestEnv::new();
    let gw = env
        .gateway()
        .limit("max_connections_per_client", 5)
        .limit("login_timeout", "60s")
        .start();
    let (visitor, admin) = (Visitor::new(&env, &gw), Admin::new(&gw, None));
    // Five silent connections from 127.0.0.1, each held until it was routed (it got the banner).
    let held: Vec<TcpStream> = (0..5)
        .map(|i| {
            let tcp = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
            let banner = read_up_to(tcp.try_clone().unwrap(), 8, SETUP);
            assert_eq!(banner, b"SSH-2.0-", "held connection {i}");
            tcp
        })
        .collect();

    // Accepted, it would get the banner after the harness's 500 ms sniff timeout.
    let sixth = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    let (bytes, closed) = read_until_closed(sixth, Duration::from_secs(5));
    let at_once = closed.is_some_and(|c| c < Duration::from_secs(2)) && bytes.is_empty();
    assert!(at_once, "sixth: closed after {closed:?}, sent {bytes:?}");
    let capped = visitor.get(DOMAIN, "/healthz", &[]);
    assert_eq!(capped.status, 0, "HTTPS from the capped address: {capped:?}");
    let other = visitor.get(DOMAIN, "/healthz", &["--interface", "127.0.0.7"]);
    assert_eq!(other.expect_status(200, "from 127.0.0.7").text(), "ok\n");
    let (scrape, labels) = (admin.scrape(), [("stage", "limits"), ("reason", "per_client")]);
    scrape.assert_at_least("edgemux_rejections_total", &labels, 2.0);

    drop(held);
    let served = || (visitor.get(DOMAIN, "/healthz", &[]).status == 200).then_some(());
    let freed = poll_until(SETUP, served);
    assert!(freed.is_some(), "127.0.0.1 still refused after closing its five");
}

#[test]
fn refused_ssh_keys_are_counted_and_each_one_slows_the_next() {
    let env = TestEnv::new();
    let good = env.key("good", KeyKind::Ed25519);
    let bad: Vec<SshKey> = ["b0", "b1", "b2", "b3"]
        .map(|n| env.key(n, KeyKind::Ed25519))
        .into();
    let gw = env.gateway().authorized_keys(&[&good]).start();
    let admin = Admin::new(&gw, None);
    let refused = || {
        let scrape = admin.scrape();
        scrape.count("edgemux_ssh_auth_attempts_total", &[("result", "refused")])
    };
    // One ssh login offering `keys` (IdentitiesOnly), which must fail; returns how long it took.
    let offer = |keys: &[SshKey]| {
        let paths: Vec<String> = keys.iter().map(|k| k.private.display().to_string()).collect();
        let extra: Vec<&str> = paths[1..].iter().flat_map(|p| ["-i", p.as_str()]).collect();
        let cmd = gw.ssh(&keys[0], Transport::Raw).command(&extra, &["tunnels"]);
        let started = Instant::now();
        let out = run_bounded(env.path(), "ssh-refused", cmd, SETUP * 2);
        let denied = !out.status.success() && out.stderr.contains("Permission denied");
        assert!(denied, "{}", out.combined());
        started.elapsed()
    };
    let before = refused();
    let one = offer(&bad[..1]);
    assert_eq!(refused() - before, 1.0, "one refused key");
    let four = offer(&bad);
    assert_eq!(refused() - before, 5.0, "then four refused keys");
    // The gateway sleeps 250 ms after the first refusal, doubling: 250 + 500 + 1000 + 2000 ms.
    let delays = Duration::from_millis(250 + 500 + 1000 + 2000);
    eprintln!("refused login with one key: {one:?}, with four: {four:?} (delays {delays:?})");
    assert!(four >= delays, "four refused keys took only {four:?}");
    let ok = gw.ssh(&good, Transport::Raw).run(&["tunnels"]);
    assert!(ok.status.success(), "good key refused: {}", ok.combined());
}

/// `curl ARGS | sha256sum` in the background: stdout is the hash, stderr curl's `STATUS SIZE`.
fn spawn_download(env: &TestEnv, visitor: &Visitor, host: &str, args: &[&str]) -> Proc {
    let mut all = args.to_vec();
    all.extend(["-w", "%{stderr}%{http_code} %{size_download}"]);
    let curl = visitor.curl(host, Duration::from_secs(170), &all);
    let mut cmd = Command::new("bash");
    cmd.args(["-o", "pipefail", "-c", "curl \"$@\" | sha256sum", "curl"]);
    cmd.args(curl.get_args()).stdin(Stdio::null());
    Proc::spawn(env.path(), "download", cmd)
}

#[test]
fn sigterm_lets_in_flight_256mib_downloads_finish_and_refuses_new_connections() {
    const LEN: u64 = 256 * MIB;
    let env = TestEnv::new();
    let mut gw = env.gateway().limit("drain_timeout", "60s").start();
    let key = env.key("a", KeyKind::Ed25519);
    let tunnel = gw.ssh(&key, Transport::Tls);
    let tunnel = tunnel.open_tunnel("app", 80, http_backend("alpha"));
    let (visitor, host, admin) = (Visitor::new(&env, &gw), key.host("app"), Admin::new(&gw, None));
    // One per protocol (h2 ends with GOAWAY, HTTP/1.1 with `Connection: close`), each limited to
    // 32 MiB/s: both are still in flight for seconds after the signal.
    let url = visitor.url(&host, &format!("/bytes/{LEN}"));
    let download = |flag| spawn_download(&env, &visitor, &host, &[flag, "--limit-rate", "32M", &url]);
    let mut downloads = ["--http2", "--http1.1"].map(|flag| (flag, download(flag)));
    let streaming = poll_until(SETUP, || {
        let member = admin.tunnels()["tunnels"][0]["members"][0].clone();
        let (requests, bytes) = (member["requests"].as_u64()?, member["bytes_in"].as_u64()?);
        (requests == 2 && bytes >= 32 * MIB).then_some(())
    });
    assert!(streaming.is_some(), "not streaming: {}", admin.tunnels());

    send_signal("TERM", &gw.pid().to_string());
    let signalled = Instant::now();
    let refused = poll_until(Duration::from_secs(5), || {
        let tcp = TcpStream::connect(("127.0.0.1", gw.port()));
        tcp.err().filter(|e| e.kind() == ErrorKind::ConnectionRefused)
    });
    assert!(refused.is_some(), "still accepting 5 s after SIGTERM");
    for (flag, download) in &mut downloads {
        assert!(download.try_wait().is_none(), "{flag}: done before the close");
    }
    for (flag, download) in &mut downloads {
        let status = download.wait_exit(Duration::from_secs(180));
        let took = signalled.elapsed();
        let whole = download.stderr().trim() == format!("200 {LEN}");
        let ok = status.is_some_and(|s| s.success()) && whole;
        assert!(ok, "{flag} after SIGTERM ({took:?})\n{}", download.describe());
        let hash = download.stdout();
        assert_eq!(hash.split_whitespace().next(), Some(&*pattern_sha256(LEN)));
        eprintln!("{flag}: all {LEN} bytes arrived, {took:?} after SIGTERM");
    }
    let late = TcpStream::connect(("127.0.0.1", gw.port()));
    assert!(late.is_err(), "a connection was accepted during the drain");

    let status = gw
        .wait_exit(SETUP)
        .expect("gateway still running after the drain");
    assert!(status.success(), "gateway exit status {status:?}");
    let log = gw.stderr();
    assert!(!log.contains("drain deadline reached"), "drain cut:\n{log}");
    let told = "the gateway is shutting down; reconnect to continue";
    tunnel.wait_output(told, true, SETUP);
}

/// The decimal serial of the certificate a new TLS handshake for `gw.test` is served.
async fn served_serial(ca_der: &Path, port: u16) -> String {
    let tls = tls_connect(ca_der, port, DOMAIN, &[b"http/1.1"]).await;
    let der = tls.get_ref().1.peer_certificates().expect("peer certificates")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse the leaf");
    cert.tbs_certificate.serial.to_string()
}

/// `GET /healthz` on an open keep-alive HTTP/1.1 connection, which must answer 200 `ok`.
async fn healthz_on<S: AsyncRead + AsyncWrite + Unpin>(tls: &mut S, what: &str) {
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        // The apex answers `ok\n` with a content-length, so the reply ends with that body.
        while !got.ends_with(b"\r\n\r\nok\n") {
            let mut buf = [0u8; 1024];
            match tls.read(&mut buf).await {
                Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(SETUP, read).await;
    let text = String::from_utf8_lossy(&got);
    let ok = text.starts_with("HTTP/1.1 200 ") && text.ends_with("\r\n\r\nok\n");
    assert!(ok, "{what}: no healthz reply on the kept connection: {text:?}");
}

#[test]
fn sighup_swaps_the_certificate_keeps_connections_and_refuses_a_broken_config() {
    let env = TestEnv::new();
    let (live_cert, live_key) = (env.path().join("live-cert.pem"), env.path().join("live-key.pem"));
    std::fs::copy(&env.pki.gw.chain, &live_cert).unwrap();
    std::fs::copy(&env.pki.gw.key, &live_key).unwrap();
    let live = Leaf {
        chain: live_cert.clone(),
        key: live_key.clone(),
    };
    let builder = env
        .gateway()
        .limit("header_timeout", "60s")
        .certificates(&[&live, &env.pki.other]);
    let config = builder.write_config();
    let gw = Gateway::start(&env, &config);
    let (ca, port, rt) = (env.pki.ca_der.clone(), gw.port(), runtime());
    let mut kept = rt.block_on(tls_connect(&ca, port, DOMAIN, &[b"http/1.1"]));
    // New handshakes see `serial`; the connection opened first still answers.
    let mut check = |what: &str, serial: &str| {
        assert_eq!(rt.block_on(served_serial(&ca, port)), serial, "{what}");
        rt.block_on(healthz_on(&mut kept, what));
    };
    check("at start (the harness leaf)", "2");

    let dir = env.path().join("pki");
    let renewed = pki::leaf(&dir, "renewed", DOMAIN, "DNS:gw.test,DNS:*.gw.test", "4242");
    std::fs::copy(&renewed.key, &live_key).unwrap();
    std::fs::copy(&renewed.chain, &live_cert).unwrap();
    let log_count = |needle: &str| gw.stderr().matches(needle).count();
    send_signal("HUP", &gw.pid().to_string());
    gw.wait_log(&["certificates reloaded"]);
    assert_eq!(log_count("certificates reloaded"), 1, "reloaded more than once");
    check("after SIGHUP", "4242");

    std::fs::write(&config, builder.set("no_such_key", 1).render()).unwrap();
    send_signal("HUP", &gw.pid().to_string());
    gw.wait_log(&["new config rejected"]);
    assert!(
        gw.stderr().contains("no_such_key"),
        "key not named:\n{}",
        gw.stderr()
    );
    assert_eq!(
        log_count("certificates reloaded"),
        1,
        "the rejected config was applied"
    );
    let after = Visitor::new(&env, &gw).get(DOMAIN, "/healthz", &[]);
    after.expect_status(200, "curl after the rejected reload");
    check("after the rejected reload", "4242");
}
