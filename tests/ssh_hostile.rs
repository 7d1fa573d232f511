//! Hostile SSH clients against the real binary: a flood of session channels and a flood of
//! refused `tcpip-forward`s on one connection are each cut with a message while the gateway's
//! memory and log stay small, and `direct-tcpip` reaches an HTTP tunnel only for its owner and
//! the keys granted to it, with the real client address (after PROXY) as the originator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::backend::read_to_eof;
use common::config::{Listener, ProxyProtocol};
use common::http::http_backend;
use common::russh_client::Scripted;
use common::ssh::{KeyKind, Transport};
use common::{Gateway, TestEnv, SETUP};
use futures_util::stream::{self, StreamExt};
use tokio::io::AsyncReadExt;

/// Requests each flood sends on its one connection.
const FLOOD: usize = 10_000;
/// Requests a flood keeps in flight (russh's client waits for each answer).
const IN_FLIGHT: usize = 64;
/// How much the gateway's RSS may grow over a flood: room for allocator noise. Unbounded,
/// 10,000 session channels on one connection grew it by 35 MB (29 to 64 MB).
const RSS_GROWTH_KIB: u64 = 12 * 1024;
/// The whole gateway log of a flood test, start-up included: a line per refusal would be some
/// 2.5 MB for a flood.
const LOG_BYTES: usize = 32 * 1024;
/// Refusals the gateway logs one by one per connection (`ssh::refusals::LOGGED_REFUSALS`).
const LOGGED_REFUSALS: usize = 5;
/// Session channels one connection may hold (`MAX_SESSIONS_PER_CONN`).
const MAX_SESSIONS: usize = 10;
/// The disconnect message once a connection's refusals reach `MAX_REFUSALS_PER_CONN` (128).
const CUT_MESSAGE: &str = "edgemux: 128 requests refused; closing the connection";

fn runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().build().unwrap()
}

/// The gateway's resident set, from `/proc/PID/status`.
fn rss_kib(gw: &Gateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits until `client`'s connection is closed and returns the disconnect message it got.
async fn wait_cut(client: &Scripted, what: &str) -> String {
    let deadline = Instant::now() + SETUP;
    while !client.handle.is_closed() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(client.handle.is_closed(), "{what}: the connection was not cut");
    client
        .disconnect_message()
        .unwrap_or_else(|| panic!("{what}: cut without a message"))
}

/// Checks what the gateway logged about a flood: the first few refusals, one line for the cut.
fn assert_log_bounded(gw: &Gateway, what: &str) {
    gw.wait_log(&["too many refused requests: disconnecting"]);
    gw.wait_log(&["refusals on this connection", "unlogged="]);
    let log = gw.stderr();
    for line in log.lines().filter(|l| l.contains("refus")) {
        println!("{what}: {line}");
    }
    let told = log.matches("request refused").count();
    assert!(
        told <= LOGGED_REFUSALS,
        "{what}: {told} refusals logged one by one"
    );
    assert_eq!(log.matches("too many refused requests").count(), 1, "{what}");
    println!("{what}: gateway log {} bytes in all", log.len());
    assert!(
        log.len() < LOG_BYTES,
        "{what}: the gateway logged {} bytes",
        log.len()
    );
}

#[test]
fn ten_thousand_session_channels_on_one_connection_are_cut_and_memory_stays_flat() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let key = env.key("a", KeyKind::Ed25519);
    let rt = runtime();
    let client = rt.block_on(Scripted::login(gw.port(), None, &key));
    let before = rss_kib(&gw);
    let started = Instant::now();
    let (opened, refused) = rt.block_on(async {
        let opens = stream::iter(0..FLOOD).map(|_| client.handle.channel_open_session());
        let results: Vec<_> = opens.buffer_unordered(IN_FLIGHT).collect().await;
        let refused = results.iter().filter(|r| r.is_err()).count();
        // The accepted channels stay open (held here) while the gateway is measured.
        (
            results.into_iter().filter_map(Result::ok).collect::<Vec<_>>(),
            refused,
        )
    });
    let (took, after) = (started.elapsed(), rss_kib(&gw));
    println!(
        "session flood of {FLOOD}: {} opened, {refused} refused in {took:?}; \
         gateway RSS {before} KiB -> {after} KiB",
        opened.len()
    );
    let message = rt.block_on(wait_cut(&client, "session flood"));
    assert_eq!(opened.len(), MAX_SESSIONS, "session channels accepted");
    assert_eq!(message, CUT_MESSAGE);
    let growth = after.saturating_sub(before);
    assert!(growth < RSS_GROWTH_KIB, "RSS grew by {growth} KiB");
    assert_log_bounded(&gw, "session flood");
    let again = gw.ssh(&key, Transport::Raw).run(&["tunnels"]);
    assert!(again.status.success(), "after the flood: {}", again.combined());
}

#[test]
fn ten_thousand_refused_forwards_on_one_connection_are_cut_and_memory_stays_flat() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let key = env.key("a", KeyKind::Ed25519);
    let rt = runtime();
    let client = rt.block_on(Scripted::login(gw.port(), None, &key));
    let before = rss_kib(&gw);
    let started = Instant::now();
    let granted = rt.block_on(async {
        // A session channel keeps the connection from being closed as one with nothing but
        // refusals (OpenSSH's `-R` without `-N`); the refusals shown on it are read and dropped.
        let mut session = client
            .handle
            .channel_open_session()
            .await
            .expect("session channel");
        tokio::spawn(async move { while session.wait().await.is_some() {} });
        // Not a DNS label: refused with a message, every time.
        let forwards = stream::iter(0..FLOOD).map(|_| client.handle.tcpip_forward("not_a-name!", 80));
        let results: Vec<_> = forwards.buffer_unordered(IN_FLIGHT).collect().await;
        results.iter().filter(|r| r.is_ok()).count()
    });
    let (took, after) = (started.elapsed(), rss_kib(&gw));
    println!("forward flood of {FLOOD}: answered in {took:?}; gateway RSS {before} KiB -> {after} KiB");
    let message = rt.block_on(wait_cut(&client, "forward flood"));
    assert_eq!(granted, 0, "forwards granted");
    assert_eq!(message, CUT_MESSAGE);
    let growth = after.saturating_sub(before);
    assert!(growth < RSS_GROWTH_KIB, "RSS grew by {growth} KiB");
    assert_log_bounded(&gw, "forward flood");
    let again = gw.ssh(&key, Transport::Raw).run(&["tunnels"]);
    assert!(again.status.success(), "after the flood: {}", again.combined());
}

/// `GET /` through `ssh -L` to `host:80`, raw HTTP/1.1 over the forward's socket.
fn get_through(fwd: &common::ssh::LocalForward, host: &str) -> String {
    let mut conn = fwd.connect();
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).unwrap();
    String::from_utf8_lossy(&read_to_eof(conn, SETUP)).into_owned()
}

#[test]
fn direct_tcpip_into_an_http_tunnel_is_for_its_owner_and_granted_keys_only() {
    let env = TestEnv::new();
    let (a, b, c) = (
        env.key("a", KeyKind::Ed25519),
        env.key("b", KeyKind::Ed25519),
        env.key("c", KeyKind::Ed25519),
    );
    let gw = env.gateway().grant(&a, &[&c]).start();
    let _tunnel = gw
        .ssh(&a, Transport::Tls)
        .open_tunnel("app", 80, http_backend("alpha"));
    let target = format!("{}:80", a.host("app"));

    let stranger = gw.ssh(&b, Transport::Tls).local_forward(&target);
    stranger.assert_channel_refused("key B into key A's HTTP tunnel");
    for (key, who) in [(&a, "the owner"), (&c, "a granted key")] {
        let fwd = gw.ssh(key, Transport::Tls).local_forward(&target);
        let reply = get_through(&fwd, &a.host("app"));
        let ok = reply.starts_with("HTTP/1.1 200") && reply.ends_with("alpha");
        assert!(ok, "{who} through ssh -L: {reply:?}");
    }
}

/// Opens `direct-tcpip` from `visitor` to `host:80` claiming a made-up originator, and returns
/// the line the tunnel client answers with (the originator it was given).
async fn origin_seen(visitor: &Scripted, host: &str) -> String {
    let channel = visitor
        .handle
        .channel_open_direct_tcpip(host, 80, "203.0.113.9", 4242)
        .await
        .expect("direct-tcpip to the owner's own tunnel");
    let mut stream = channel.into_stream();
    let mut line = String::new();
    let read = tokio::time::timeout(SETUP, stream.read_to_string(&mut line)).await;
    read.expect("tunnel client's answer in time")
        .expect("read the answer");
    line
}

#[test]
fn the_tunnel_client_is_told_the_real_client_address_never_the_claimed_one() {
    let env = TestEnv::new();
    let listener = Listener::local().proxy_protocol(ProxyProtocol::Optional, &["127.0.0.1"]);
    let gw = env.gateway().listeners(&[listener]).start();
    let a = env.key("a", KeyKind::Ed25519);
    let host = a.host("app");
    runtime().block_on(async {
        let tunnel = Scripted::login(gw.port(), None, &a).await;
        tunnel
            .handle
            .tcpip_forward("app", 80)
            .await
            .expect("register app:80");

        let direct = Scripted::login(gw.port(), None, &a).await;
        let line = origin_seen(&direct, &host).await;
        assert_eq!(line, format!("origin 127.0.0.1:{}\n", direct.local.port()));

        // Behind a load balancer, the address from its PROXY header.
        let header = format!("PROXY TCP4 198.51.100.7 127.0.0.1 40000 {}\r\n", gw.port());
        let behind = Scripted::login(gw.port(), Some(&header), &a).await;
        assert_eq!(origin_seen(&behind, &host).await, "origin 198.51.100.7:40000\n");

        let claimed = ("203.0.113.9".to_owned(), 4242);
        let seen = tunnel.originators();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            !seen.contains(&claimed),
            "the claimed originator reached the tunnel client"
        );
    });
}
