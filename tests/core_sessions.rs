//! The SSH side of tunnels with the real OpenSSH client: name checks, authorized keys of every
//! type, dead clients swept by keepalives, the `tunnels` command and the interactive session.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::backend::echo_server;
use common::process::{poll_until, Proc};
use common::ssh::{KeyKind, Transport};
use common::{TestEnv, SETUP};

/// The remote port of the TCP tunnels here (any port but 80/443 makes a TCP tunnel).
const PORT: u16 = 5432;

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
    assert!(!out.status.success(), "unlisted key got in: {}", out.combined());
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
    let mut holder = client.open_tunnel("db", PORT, echo_server());

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
    // SIGKILL ssh only: its `openssl s_client -quiet` ProxyCommand keeps the TLS connection
    // open until the gateway next writes to it (s_client then hits the dead pipe and quits).
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
    for (name, port, kind) in [("db", PORT, "tcp"), ("web", 80, "http"), ("api", 3000, "tcp")] {
        let entry = client
            .find_tunnel(name)
            .unwrap_or_else(|| panic!("no {name:?} in {list}"));
        assert_eq!(entry["host"], a.host(name), "{entry}");
        assert_eq!(entry["port"], port, "{entry}");
        assert_eq!(entry["kind"], kind, "{entry}");
        let url = entry["url"].as_str().unwrap_or_default();
        if kind == "http" {
            assert_https_url(url, &a.host(name), gw.port());
        } else {
            assert!(url.contains(&a.host(name)), "url {url:?} lacks the host: {entry}");
        }
    }
}

/// An HTTP tunnel's URL in `text` is usable: `https://HOST` or `https://HOST:PORT` with the port
/// the gateway really listens on (never the `0` of a `127.0.0.1:0` bind).
fn assert_https_url(text: &str, host: &str, port: u16) {
    let base = format!("https://{host}");
    let at = text
        .find(&base)
        .unwrap_or_else(|| panic!("no {base} in {text:?}"));
    if let Some(after) = text[at + base.len()..].strip_prefix(':') {
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        assert_eq!(
            digits,
            port.to_string(),
            "URL port is not the listener's: {text:?}"
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

    let printed = session.wait_output(&a.host("web"), false, SETUP);
    assert_https_url(&printed, &a.host("web"), gw.port());
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

#[test]
fn a_reserved_vanity_host_is_served_only_for_its_key() {
    let env = TestEnv::new();
    let (owner, other) = (
        env.key("owner", KeyKind::Ed25519),
        env.key("other", KeyKind::Ed25519),
    );
    let gw = env.gateway().reserve("app.example.com", &owner).start();
    let echo = echo_server();
    let spec = format!("app.example.com:80:127.0.0.1:{echo}");

    let intruder = gw.ssh(&other, Transport::Tls);
    let mut ssh = intruder.spawn(
        "ssh-intruder",
        &["-o", "ExitOnForwardFailure=no", "-N", "-R", &spec],
        &[],
    );
    assert!(ssh.wait_exit(SETUP).is_some(), "{}", ssh.describe());
    let said = gateway_messages(&ssh.stderr());
    assert!(
        said.contains("reserved for another key"),
        "no refusal message:\n{said}"
    );

    let client = gw.ssh(&owner, Transport::Tls);
    let _holder = client.spawn("ssh-owner", &["-N", "-R", &spec], &[]);
    let shown = poll_until(SETUP, || {
        let tunnels = client.tunnels();
        let list = tunnels["tunnels"].as_array()?.clone();
        list.into_iter().find(|t| t["host"] == "app.example.com")
    });
    let tunnel = shown.unwrap_or_else(|| panic!("the owner's vanity tunnel never appeared\n{}", gw.stderr()));
    assert_eq!(tunnel["kind"], "http", "{tunnel}");
}
