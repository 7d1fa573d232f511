//! TLS passthrough by SNI (`ssh -R app:443:… gw -- tls=passthrough`): the real `ssh` over
//! `openssl s_client`, `openssl s_server` as the developer's own TLS server with a certificate
//! from its own CA, `curl` and `openssl s_client` as visitors, HAProxy sending PROXY v2 in front.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::config::{Listener, ProxyProtocol};
use common::haproxy::{Haproxy, SendProxy};
use common::http::{http_backend, pattern, Visitor};
use common::process::{run_bounded, Proc};
use common::prom::Admin;
use common::ssh::{KeyKind, SshKey, Transport};
use common::{Gateway, TestEnv, SETUP};

const BODY_LEN: usize = 1024 * 1024;

/// The developer's own TLS server for `host`, serving `body.bin` (1 MiB).
fn developer_server(env: &TestEnv, host: &str) -> (Proc, u16, std::path::PathBuf) {
    common::pki::own_tls_server(&env.path().join("developer"), host, &pattern(BODY_LEN as u64))
}

struct Site {
    env: TestEnv,
    gw: Gateway,
    key: SshKey,
    haproxy: Haproxy,
}

fn site() -> Site {
    let env = TestEnv::new();
    let gw = env
        .gateway()
        .listeners(&[
            Listener::local().proxy_protocol(ProxyProtocol::Off, &[]),
            Listener::local().proxy_protocol(ProxyProtocol::Required, &["127.0.0.1"]),
        ])
        .start();
    let haproxy = Haproxy::start(env.path(), gw.ports()[1], SendProxy::V2);
    let key = env.key("dev", KeyKind::Ed25519);
    Site {
        env,
        gw,
        key,
        haproxy,
    }
}

fn curl(
    env: &TestEnv,
    host: &str,
    port: u16,
    ca: &std::path::Path,
    args: &[&str],
) -> common::process::Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .args(args);
    run_bounded(env.path(), "curl", cmd, SETUP)
}

#[test]
fn passthrough_hands_the_visitors_tls_to_the_developers_server() {
    common::require_tools();
    let s = site();
    let host = s.key.host("app");
    let (_server, backend, developer_ca) = developer_server(&s.env, &host);
    let client = s.gw.ssh(&s.key, Transport::Tls);
    let spec = format!("app:443:127.0.0.1:{backend}");
    let holder = client.spawn(
        "ssh-R-passthrough",
        &["-v", "-R", &spec],
        &["--", "tls=passthrough"],
    );
    client.wait_tunnel("app", &holder);
    holder.wait_output("upstream", false, SETUP);
    // A terminated tunnel on the same port, for contrast.
    let plain = client.open_tunnel("web", 80, http_backend("web"));
    let web = s.key.host("web");

    // Through HAProxy (PROXY v2) from 127.0.0.5: the developer's certificate verifies with the
    // developer's CA, and the body arrives byte for byte.
    let body = s.env.path().join("got.bin");
    let out = curl(
        &s.env,
        &host,
        s.haproxy.port,
        &developer_ca,
        &[
            "--interface",
            "127.0.0.5",
            "-o",
            body.to_str().unwrap(),
            &format!("https://{host}:{}/body.bin", s.haproxy.port),
        ],
    );
    assert!(
        out.status.success(),
        "curl through passthrough: {}",
        out.combined()
    );
    let got = std::fs::read(&body).unwrap();
    assert_eq!(got.len(), BODY_LEN, "body length");
    assert!(got == pattern(BODY_LEN as u64), "the 1 MiB body arrived altered");
    holder.wait_output("originator 127.0.0.5 port", true, SETUP);

    // The gateway's CA does not verify it: the gateway did not terminate this TLS.
    let out = curl(
        &s.env,
        &host,
        s.gw.port(),
        &s.env.pki.ca,
        &[&format!("https://{host}:{}/body.bin", s.gw.port())],
    );
    assert!(
        !out.status.success(),
        "the gateway's CA verified a passthrough host"
    );

    // openssl s_client shows the developer's certificate.
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{}", s.gw.port()),
        "-servername",
        &host,
        "-CAfile",
    ])
    .arg(&developer_ca)
    .args(["-verify_return_error", "-verify_hostname", &host]);
    let out = run_bounded(s.env.path(), "s_client", cmd, SETUP);
    let text = out.combined();
    assert!(
        text.contains("developer app"),
        "s_client did not see the developer's certificate:\n{text}"
    );
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "s_client did not verify:\n{text}"
    );

    // Another host on the same port is still terminated by the gateway.
    let visitor = Visitor::new(&s.env, &s.gw);
    visitor
        .get(&web, "/", &[])
        .expect_status(200, "a terminated tunnel beside a passthrough one");
    // HTTP for the passthrough host, reached with another SNI: 421, never spoken to as HTTP.
    let out = curl(
        &s.env,
        &web,
        s.gw.port(),
        &s.env.pki.ca,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {host}"),
            &format!("https://{web}:{}/", s.gw.port()),
        ],
    );
    assert_eq!(out.stdout.trim(), "421", "{}", out.combined());

    let tunnels = client.tunnels();
    let app = tunnels.to_string();
    assert!(
        app.contains("\"upstream\":\"passthrough\""),
        "tunnels should show the mode: {app}"
    );
    Admin::new(&s.gw, None).scrape().assert_at_least(
        "edgemux_tunnel_upstream_requests_total",
        &[("upstream", "passthrough")],
        3.0,
    );
    drop(plain);
}

#[test]
fn passthrough_refuses_rules_that_need_http_and_port_80() {
    common::require_tools();
    let s = site();
    let client = s.gw.ssh(&s.key, Transport::Tls);
    let backend = http_backend("x");
    for (spec, options, want) in [
        ("a:443", "tls=passthrough auth=u:p", "need the HTTP requests"),
        ("b:80", "tls=passthrough", "b:80 is not one"),
        (
            "c:443",
            "tls=passthrough upstream=h2c",
            "upstream= does not apply",
        ),
    ] {
        let spec = format!("{spec}:127.0.0.1:{backend}");
        let cmd = client.command(&["-R", &spec], &["--", options]);
        let out = run_bounded(s.env.path(), "ssh-refused", cmd, SETUP);
        assert_eq!(out.status.code(), Some(2), "{options}: {}", out.combined());
        assert!(
            out.stderr.contains(want),
            "{options}: wanted {want:?} in {}",
            out.stderr
        );
    }
    // An allow list that leaves the visitor out: the connection is closed, nothing is opened.
    let host = s.key.host("d");
    let (_server, backend, developer_ca) = developer_server(&s.env, &host);
    let spec = format!("d:443:127.0.0.1:{backend}");
    let holder = client.spawn(
        "ssh-allow",
        &["-R", &spec],
        &["--", "tls=passthrough", "allow=10.9.9.9"],
    );
    client.wait_tunnel("d", &holder);
    holder.wait_output("upstream", false, SETUP);
    let out = curl(
        &s.env,
        &host,
        s.gw.port(),
        &developer_ca,
        &[&format!("https://{host}:{}/body.bin", s.gw.port())],
    );
    assert!(!out.status.success(), "a visitor outside allow= got through");
    s.gw.wait_log(&["client address not in the tunnel's allow list"]);
}
