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
use common::backend::{read_to_eof, read_up_to, round_trip};
use common::process::{poll_until, Proc};
use common::ssh::{KeyKind, LocalForward, SshClient, Transport};
use common::{TestEnv, SETUP};

/// The remote port of every TCP tunnel here (any port but 80/443 makes a TCP tunnel).
const PORT: u16 = 5432;

/// Registers `NAME` on `PORT` forwarding to `backend`, and waits until `tunnels` lists it.
fn open_tunnel(client: &SshClient, name: &str, backend: u16) -> Proc {
    let holder = client.remote_forward(&format!("{name}:{PORT}:127.0.0.1:{backend}"));
    client.wait_tunnel(name, &holder);
    holder
}

/// `ssh -L` from `client` to `host:PORT`.
fn forward_to(client: &SshClient, host: &str) -> LocalForward {
    client.local_forward(&format!("{host}:{PORT}"))
}

/// A refused channel: the local connection closes without a byte, and ssh reports the failed open.
fn assert_refused(fwd: &LocalForward, what: &str) {
    let mut conn = fwd.connect();
    let _ = conn.write_all(b"anyone there?\n");
    let got = read_to_eof(conn, SETUP);
    assert!(
        got.is_empty(),
        "{what}: expected no data, got {:?}",
        String::from_utf8_lossy(&got)
    );
    fwd.proc.wait_output("open failed", true, SETUP);
}

/// 1 MiB of random bytes through `ssh -L` to the owner's own tunnel comes back unchanged.
fn owner_round_trips_1mib(transport: Transport) {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, transport);
    let _tunnel = open_tunnel(&client, "db", echo_server());
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
    let (a, b) = (
        env.key("a", KeyKind::Ed25519),
        env.key("b", KeyKind::Ed25519),
    );
    let _tunnel = open_tunnel(&gw.ssh(&a, Transport::Tls), "db", echo_server());

    let fwd = forward_to(&gw.ssh(&b, Transport::Tls), &a.host("db"));
    assert_refused(&fwd, "key B to key A's private tunnel");
}

#[test]
fn direct_tcpip_to_anything_but_a_tunnel_is_refused() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let echo = echo_server();
    let _tunnel = open_tunnel(&client, "db", echo);

    let admin = client.local_forward(&format!("127.0.0.1:{}", gw.admin_port()));
    assert_refused(&admin, "the admin listener");
    // A live local service that is not a tunnel: the gateway must not be an open proxy.
    let local = client.local_forward(&format!("127.0.0.1:{echo}"));
    assert_refused(&local, "a local port that is not a tunnel");
}

#[test]
fn granted_key_reaches_owner_tunnel_and_others_stay_refused() {
    let env = TestEnv::new();
    let a = env.key("a", KeyKind::Ed25519);
    let b = env.key("b", KeyKind::Ed25519);
    let c = env.key("c", KeyKind::Ed25519);
    let gw = env.gateway().grant(&a, &[&b]).start();
    let _tunnel = open_tunnel(&gw.ssh(&a, Transport::Tls), "db", echo_server());

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
    assert_refused(&fwd, "key C, not in A's grant");
}

#[test]
fn same_name_under_two_keys_gives_two_tunnels() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let (a, b) = (
        env.key("a", KeyKind::Ed25519),
        env.key("b", KeyKind::Ed25519),
    );
    let (client_a, client_b) = (gw.ssh(&a, Transport::Tls), gw.ssh(&b, Transport::Tls));
    let _tunnel_a = open_tunnel(&client_a, "db", id_server("alpha"));
    let _tunnel_b = open_tunnel(&client_b, "db", id_server("bravo"));

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
fn same_key_and_name_twice_is_a_round_robin_pool() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let _first = open_tunnel(&client, "db", id_server("one"));
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
        "second pool member never served a connection: {seen:?}"
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
    let _tunnel = open_tunnel(
        &client,
        "db",
        push_or_echo_server(PUSH, Arc::clone(&pushed)),
    );
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
    let stuck_at =
        stuck_at.expect("the backend kept pushing: no back-pressure within the deadline");
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

/// ssh's stderr without the known-hosts notice, which is not the gateway's message.
fn gateway_messages(stderr: &str) -> String {
    let lines = stderr.lines().filter(|l| !l.contains("known hosts"));
    lines.collect::<Vec<_>>().join("\n").to_lowercase()
}

#[test]
fn bad_tunnel_names_are_refused_with_a_message() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let echo = echo_server();
    let too_long = "a".repeat(70);
    for bad in ["Bad_Name!", "-leading-dash", too_long.as_str()] {
        let spec = format!("{bad}:{PORT}:127.0.0.1:{echo}");
        // ExitOnForwardFailure=no: ssh must stay to hear why, and the gateway must end it.
        let mut ssh = client.spawn(
            "ssh-bad",
            &["-o", "ExitOnForwardFailure=no", "-N", "-R", &spec],
            &[],
        );
        let status = ssh.wait_exit(SETUP);
        assert!(
            status.is_some(),
            "{bad:?}: gateway kept a -N client with no tunnel\n{}",
            ssh.describe()
        );
        let said = gateway_messages(&ssh.stderr());
        assert!(
            said.contains("name"),
            "{bad:?}: no message about the name:\n{said}"
        );
    }
    let left = client.tunnels();
    assert_eq!(
        left["tunnels"].as_array().map(Vec::len),
        Some(0),
        "a bad name was registered: {left}"
    );

    // With a session channel the refusal is written to the session's stderr.
    let spec = format!("Bad_Name!:{PORT}:127.0.0.1:{echo}");
    let session = client.spawn(
        "ssh-bad-session",
        &["-T", "-o", "ExitOnForwardFailure=no", "-R", &spec],
        &[],
    );
    let said = poll_until(SETUP, || {
        Some(gateway_messages(&session.stderr())).filter(|s| s.contains("name"))
    });
    assert!(
        said.is_some(),
        "session got no message about the name\n{}",
        session.describe()
    );
}

#[test]
fn authorized_keys_mode_admits_listed_keys_of_every_type_only() {
    let env = TestEnv::new();
    let ed = env.key("ed", KeyKind::Ed25519);
    let ec = env.key("ec", KeyKind::Ecdsa);
    let rsa = env.key("rsa", KeyKind::Rsa);
    let stranger = env.key("stranger", KeyKind::Ed25519);
    let gw = env.gateway().authorized_keys(&[&ed, &ec, &rsa]).start();

    for key in [&ed, &ec, &rsa] {
        let list = gw.ssh(key, Transport::Tls).tunnels();
        assert_eq!(
            list["keyid"],
            key.keyid.as_str(),
            "{}: {list}",
            key.public.display()
        );
    }
    let out = gw.ssh(&stranger, Transport::Tls).run(&["tunnels"]);
    assert!(
        !out.status.success(),
        "unlisted key got in: {}",
        out.combined()
    );
    assert!(
        out.stderr.contains("Permission denied"),
        "no `Permission denied`: {}",
        out.stderr
    );
}

/// The tunnel disappears within the keepalive window (1 s x (2 + 1) = 3 s, bound 10 s) once
/// its client stops answering.
fn dead_client_tunnel_goes_away(transport: Transport, stop: fn(&mut Proc)) {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, transport);
    let mut holder = open_tunnel(&client, "db", echo_server());

    stop(&mut holder);
    let started = Instant::now();
    let gone = poll_until(Duration::from_secs(10), || {
        client.find_tunnel("db").is_none().then_some(())
    });
    assert!(
        gone.is_some(),
        "tunnel still listed {:?} after its client died",
        started.elapsed()
    );
}

#[test]
fn killed_client_tunnel_is_removed_while_its_tls_proxy_holds_the_connection() {
    // SIGKILL ssh only: its `openssl s_client -quiet` ProxyCommand keeps the TLS connection.
    dead_client_tunnel_goes_away(Transport::Tls, Proc::kill_only_self);
}

#[test]
fn frozen_client_tunnel_is_removed_by_keepalives() {
    // SIGSTOP: the TCP connection stays open and silent, only keepalives can notice.
    dead_client_tunnel_goes_away(Transport::Raw, |p| p.freeze());
}

#[test]
fn tunnels_command_lists_the_callers_tunnels_as_json() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls).with_user("api");
    let echo = echo_server();
    let specs = [
        format!("db:{PORT}:127.0.0.1:{echo}"),
        format!("web:80:127.0.0.1:{echo}"),
    ];
    // No bind name: the tunnel is named after the SSH user.
    let unnamed = format!("3000:localhost:{echo}");
    let args = ["-N", "-R", &specs[0], "-R", &specs[1], "-R", &unnamed];
    let holder = client.spawn("ssh-R", &args, &[]);

    let list = poll_until(SETUP, || {
        let list = client.tunnels();
        (list["tunnels"].as_array().map(Vec::len) == Some(3)).then_some(list)
    });
    let list = list.unwrap_or_else(|| panic!("three tunnels never listed\n{}", holder.describe()));
    assert_eq!(list["keyid"], a.keyid.as_str(), "{list}");
    for (name, port, kind) in [
        ("db", PORT, "tcp"),
        ("web", 80, "http"),
        ("api", 3000, "tcp"),
    ] {
        let entry = client
            .find_tunnel(name)
            .unwrap_or_else(|| panic!("no {name:?} in {list}"));
        assert_eq!(entry["host"], a.host(name), "{entry}");
        assert_eq!(entry["port"], port, "{entry}");
        assert_eq!(entry["kind"], kind, "{entry}");
        let url = entry["url"].as_str().unwrap_or_default();
        assert!(
            url.contains(&a.host(name)),
            "url {url:?} does not name the host: {entry}"
        );
    }
}

/// An interactive session prints its tunnel's URL and stays open.
fn session_prints_url(options: &[&str]) {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let a = env.key("a", KeyKind::Ed25519);
    let client = gw.ssh(&a, Transport::Tls);
    let spec = format!("web:80:127.0.0.1:{}", echo_server());
    let mut args = options.to_vec();
    args.extend(["-R", &spec]);
    let mut session = client.spawn("ssh-session", &args, &[]);

    session.wait_output(&a.host("web"), false, SETUP);
    assert!(
        session.try_wait().is_none(),
        "session closed after printing\n{}",
        session.describe()
    );
}

#[test]
fn interactive_session_with_pty_prints_the_tunnel_url() {
    session_prints_url(&["-tt"]);
}

#[test]
fn interactive_session_without_pty_prints_the_tunnel_url() {
    session_prints_url(&["-T"]);
}
