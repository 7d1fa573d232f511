//! Private TCP tunnels end to end with the real OpenSSH client: `ssh -R` registers, `ssh -L`
//! reaches, keys are namespaced, access is checked, pools share load, a stalled reader stalls
//! only itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::backend::{echo_server, id_server, push_or_echo_server, random_bytes};
use common::backend::{read_up_to, round_trip};
use common::process::poll_until;
use common::ssh::{KeyKind, LocalForward, SshClient, Transport};
use common::{TestEnv, SETUP};

/// The remote port of every TCP tunnel here (any port but 80/443 makes a TCP tunnel).
const PORT: u16 = 5432;

/// `ssh -L` from `client` to `host:PORT`.
fn forward_to(client: &SshClient, host: &str) -> LocalForward {
    client.local_forward(&format!("{host}:{PORT}"))
}

/// 1 MiB of random bytes through `ssh -L` to the owner's own tunnel comes back unchanged.
fn owner_round_trips_1mib(transport: Transport) {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, transport);
    let _tunnel = client.open_tunnel("db", PORT, echo_server());
    let fwd = forward_to(&client, &a.host("db"));

    let payload = random_bytes(1 << 20);
    let echoed = round_trip(fwd.connect(), &payload, SETUP);
    assert!(
        echoed == payload,
        "echo through the tunnel differs: got {} of {} bytes",
        echoed.len(),
        payload.len()
    );
}

#[test]
fn tcp_tunnel_round_trips_1mib_over_tls_with_sniffing() {
    owner_round_trips_1mib(Transport::Tls);
}

#[test]
fn tcp_tunnel_round_trips_1mib_over_tls_with_alpn_ssh() {
    owner_round_trips_1mib(Transport::TlsAlpnSsh);
}

#[test]
fn tcp_tunnel_round_trips_1mib_over_raw_ssh() {
    owner_round_trips_1mib(Transport::Raw);
}

#[test]
fn other_key_is_refused_for_a_private_tunnel() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let (a, b) = (env.key("a", KeyKind::Ed25519), env.key("b", KeyKind::Ed25519));
    let _tunnel = gw.ssh(&a, Transport::Tls).open_tunnel("db", PORT, echo_server());

    let fwd = forward_to(&gw.ssh(&b, Transport::Tls), &a.host("db"));
    fwd.assert_channel_refused("key B to key A's private tunnel");
}

#[test]
fn direct_tcpip_to_anything_but_a_tunnel_is_refused() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let echo = echo_server();
    let _tunnel = client.open_tunnel("db", PORT, echo);

    let admin = client.local_forward(&format!("127.0.0.1:{}", gw.admin_port()));
    admin.assert_channel_refused("the admin listener");
    // A live local service that is not a tunnel: the gateway must not be an open proxy.
    let local = client.local_forward(&format!("127.0.0.1:{echo}"));
    local.assert_channel_refused("a local port that is not a tunnel");
}

#[test]
fn granted_key_reaches_owner_tunnel_and_others_stay_refused() {
    let env = TestEnv::new();
    let a = env.key("a", KeyKind::Ed25519);
    let b = env.key("b", KeyKind::Ed25519);
    let c = env.key("c", KeyKind::Ed25519);
    let gw = env.gateway().grant(&a, &[&b]).start();
    let _tunnel = gw.ssh(&a, Transport::Tls).open_tunnel("db", PORT, echo_server());

    // The short `NAME-KEYID` form works as well as the full host.
    let fwd = forward_to(&gw.ssh(&b, Transport::Tls), &format!("db-{}", a.keyid));
    let payload = random_bytes(64 * 1024);
    let echoed = round_trip(fwd.connect(), &payload, SETUP);
    assert!(
        echoed == payload,
        "granted key B: got {} of {} bytes",
        echoed.len(),
        payload.len()
    );

    let fwd = forward_to(&gw.ssh(&c, Transport::Tls), &a.host("db"));
    fwd.assert_channel_refused("key C, not in A's grant");
}

#[test]
fn same_name_under_two_keys_gives_two_tunnels() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let (a, b) = (env.key("a", KeyKind::Ed25519), env.key("b", KeyKind::Ed25519));
    let (client_a, client_b) = (gw.ssh(&a, Transport::Tls), gw.ssh(&b, Transport::Tls));
    let _tunnel_a = client_a.open_tunnel("db", PORT, id_server("alpha"));
    let _tunnel_b = client_b.open_tunnel("db", PORT, id_server("bravo"));

    let (list_a, list_b) = (client_a.tunnels(), client_b.tunnels());
    assert_ne!(a.keyid, b.keyid);
    assert_eq!(
        list_a["tunnels"].as_array().map(Vec::len),
        Some(1),
        "A sees only its own: {list_a}"
    );
    assert_eq!(
        list_b["tunnels"].as_array().map(Vec::len),
        Some(1),
        "B sees only its own: {list_b}"
    );
    assert_eq!(list_a["tunnels"][0]["host"], a.host("db"), "{list_a}");
    assert_eq!(list_b["tunnels"][0]["host"], b.host("db"), "{list_b}");

    for (client, key, id) in [(&client_a, &a, "alpha\n"), (&client_b, &b, "bravo\n")] {
        let fwd = forward_to(client, &key.host("db"));
        let got = read_up_to(fwd.connect(), id.len(), SETUP);
        assert_eq!(
            String::from_utf8_lossy(&got),
            id,
            "{} reached the wrong backend",
            key.keyid
        );
    }
}

#[test]
fn key_id_claims_are_kept_in_the_state_dir_and_survive_a_restart() {
    let env = TestEnv::new();
    let a = env.key("a", KeyKind::Ed25519);
    let builder = env.gateway();
    let claims = env.path().join("certs/key-owners");
    {
        let gw = builder.clone().start();
        let _tunnel = gw.ssh(&a, Transport::Tls).open_tunnel("db", PORT, echo_server());
    }
    let text = std::fs::read_to_string(&claims).expect("the claim is written under certs_dir");
    assert_eq!(
        text,
        format!("{} {}\n", a.keyid, a.fingerprint),
        "one line per claimed key id"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&claims).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the claims file is private");

    // After a restart the owner still serves its id, and the file does not grow for it.
    let gw = builder.start();
    let client = gw.ssh(&a, Transport::Tls);
    let _tunnel = client.open_tunnel("db", PORT, echo_server());
    let echoed = round_trip(forward_to(&client, &a.host("db")).connect(), b"again", SETUP);
    assert_eq!(echoed, b"again");
    assert_eq!(std::fs::read_to_string(&claims).unwrap(), text);
}

#[test]
fn same_key_and_name_twice_is_a_round_robin_pool() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let _first = client.open_tunnel("db", PORT, id_server("one"));
    let _second = client.remote_forward(&format!("db:{PORT}:127.0.0.1:{}", id_server("two")));
    let fwd = forward_to(&client, &a.host("db"));
    let reach = || String::from_utf8_lossy(&read_up_to(fwd.connect(), 4, SETUP)).into_owned();

    // Nothing tells us when the second member has joined, so connect until it answers (bounded).
    let mut seen = Vec::new();
    let joined = poll_until(SETUP, || {
        seen.push(reach());
        (seen.last().map(String::as_str) == Some("two\n")).then_some(())
    });
    assert!(
        joined.is_some(),
        "second pool member never served any of {} connections (last: {:?})",
        seen.len(),
        seen.last()
    );

    let next: Vec<String> = (0..4).map(|_| reach()).collect();
    for pair in next.windows(2) {
        assert!(
            ["one\n", "two\n"].contains(&pair[0].as_str()) && pair[0] != pair[1],
            "connections are not spread round-robin over the pool: {next:?}"
        );
    }
}

#[test]
fn stalled_reader_does_not_block_another_connection_to_the_tunnel() {
    const PUSH: u64 = 64 << 20;
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let pushed = Arc::new(AtomicU64::new(0));
    let _tunnel = client.open_tunnel("db", PORT, push_or_echo_server(PUSH, Arc::clone(&pushed)));
    // Both connections share one `ssh -L` (one SSH connection, two channels).
    let fwd = forward_to(&client, &a.host("db"));

    let mut stalled = fwd.connect();
    stalled.write_all(b"P").unwrap();
    // Back-pressure has reached the backend once it makes no progress for a while (bounded).
    let (mut last, mut since) = (0, Instant::now());
    let stuck_at = poll_until(SETUP, || {
        let now = pushed.load(Ordering::Relaxed);
        if now != last || now == 0 {
            (last, since) = (now, Instant::now());
            return None;
        }
        (since.elapsed() > Duration::from_millis(500)).then_some(now)
    });
    let stuck_at = stuck_at.expect("the backend kept pushing: no back-pressure within the deadline");
    assert!(
        stuck_at < PUSH,
        "the whole {PUSH} bytes were accepted for a reader that never reads: unbounded buffering"
    );

    let mut live = fwd.connect();
    live.write_all(b"E").unwrap();
    let payload = random_bytes(16 * 1024);
    let started = Instant::now();
    let echoed = round_trip(live, &payload, Duration::from_secs(5));
    assert!(
        echoed == payload,
        "echo beside a stalled reader: got {} of {} bytes after {:?}",
        echoed.len(),
        payload.len(),
        started.elapsed()
    );
    drop(stalled);
}

/// One TCP socket of a process, from `/proc/net/tcp{,6}`.
#[derive(Debug)]
struct Socket {
    local_port: u16,
    remote_port: u16,
    listening: bool,
}

/// Every TCP socket `pid` holds: its fds' socket inodes looked up in `/proc/net/tcp{,6}`.
fn tcp_sockets(pid: u32) -> Vec<Socket> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the gateway's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap_or(""), 16).unwrap();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && inodes.contains(f[9]) {
                out.push(Socket {
                    local_port: port(f[1]),
                    remote_port: port(f[2]),
                    listening: f[3] == "0A",
                });
            }
        }
    }
    out
}

/// Without `[cluster]` a gateway is one node: while it serves a tunnel, it listens only where its
/// config says and holds no connection it opened itself (no store client, no peer listener).
#[test]
fn a_single_node_opens_no_store_client_and_no_peer_listener() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let _tunnel = client.open_tunnel("db", PORT, echo_server());
    let fwd = forward_to(&client, &a.host("db"));
    assert_eq!(round_trip(fwd.connect(), b"ping", SETUP), b"ping");

    let sockets = tcp_sockets(gw.pid());
    // The test gateway's config has one listener and the admin listener.
    let mut ours: std::collections::BTreeSet<u16> = gw.ports().iter().copied().collect();
    ours.insert(gw.admin_port());
    let listening: std::collections::BTreeSet<u16> = sockets
        .iter()
        .filter(|s| s.listening)
        .map(|s| s.local_port)
        .collect();
    assert_eq!(listening, ours, "listening sockets: {sockets:?}");
    let accepted = sockets.iter().filter(|s| !s.listening).count();
    assert!(accepted >= 1, "the ssh connection is one: {sockets:?}");
    for s in sockets.iter().filter(|s| !s.listening) {
        assert!(
            ours.contains(&s.local_port) && s.remote_port != 2379,
            "a connection the gateway opened itself: {s:?} (all: {sockets:?})"
        );
    }
}
