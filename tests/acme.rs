//! Certificates by ACME against a real Pebble: issuance through TLS-ALPN-01 and HTTP-01, reuse of
//! the stored certificate across a restart, forced renewal swapped in under an open connection,
//! on-demand certificates for tunnel hosts, and a dead CA that leaves the certificate in service.
//! Every certificate is checked the way a client sees it: a handshake trusting Pebble's root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::backend::echo_server;
use common::pebble::{self, AcmeSetup, Challenge, ServedCert, ISSUE};
use common::process::{poll_until, Proc};
use common::ssh::{KeyKind, Transport};
use common::{Gateway, TestEnv, DOMAIN, SETUP};

const ORDERS_OK: &str = "edgemux_acme_orders_total{result=\"ok\"}";
const ORDERS_FAILED: &str = "edgemux_acme_orders_total{result=\"failed\"}";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: gw.test\r\n\r\n";

/// One request to the admin listener: (status, body).
fn admin(gw: &Gateway, method: &str, path: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", gw.admin_port())).expect("connect to admin");
    conn.set_read_timeout(Some(SETUP)).expect("set read timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).expect("write admin request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read admin response");
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok());
    let status = status.unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// The value of one exact series on `/metrics`, if it is exported.
fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let (status, body) = admin(gw, "GET", "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `POST /acme/renew` is accepted.
fn force_renewal(gw: &Gateway) {
    let (status, body) = admin(gw, "POST", "/acme/renew");
    assert_eq!(status, 202, "POST /acme/renew: {body}");
}

/// Waits until the apex serves a Pebble-issued certificate for `gw.test` and returns it.
fn wait_issued(acme: &AcmeSetup) -> ServedCert {
    let cert = acme
        .pebble
        .wait_served(acme.gateway.port(), DOMAIN, ServedCert::is_pebble);
    assert_eq!(cert.dns_names, [DOMAIN], "issued certificate names: {cert:?}");
    cert
}

/// Issuance through `challenge`, checked from a client, the log, the state dir and the metrics.
fn issues_through(challenge: Challenge, answered: &str, not_answered: &str) {
    let env = TestEnv::new();
    let acme = pebble::start(&env, challenge, false);
    let gw = &acme.gateway;
    let cert = wait_issued(&acme);

    gw.wait_log_within(ISSUE, &["certificate issued and in service"]);
    let log = gw.stderr();
    assert!(log.contains("ACME order placed"), "no order logged:\n{log}");
    assert!(
        log.contains(answered),
        "the validation was not answered as {answered:?}:\n{log}"
    );
    assert!(!log.contains(not_answered), "unexpected {not_answered:?}:\n{log}");

    let state = env.path().join("state/acme");
    for file in ["gw.test.crt", "gw.test.key"] {
        let mode = std::fs::metadata(state.join(file))
            .expect(file)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} has mode {:o}", mode & 0o777);
    }
    let accounts = std::fs::read_dir(&state).expect("read state dir");
    let names: Vec<String> = accounts
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("account-") && n.ends_with(".json")),
        "no stored ACME account in {names:?}"
    );

    assert!(metric(gw, ORDERS_OK) >= Some(1.0), "{ORDERS_OK} not counted");
    let expiry = format!("edgemux_certificate_expiry_timestamp_seconds{{name=\"{DOMAIN}\"}}");
    assert_eq!(
        metric(gw, &expiry),
        Some(cert.not_after as f64),
        "{expiry} differs from the served certificate's notAfter"
    );
}

#[test]
fn tls_alpn_01_issues_a_certificate_served_on_the_main_port() {
    issues_through(
        Challenge::TlsAlpn01,
        "answered an ACME TLS-ALPN-01 validation",
        "answered an ACME HTTP-01 validation",
    );
}

#[test]
fn http_01_issues_a_certificate_through_the_plain_http_listener() {
    issues_through(
        Challenge::Http01,
        "answered an ACME HTTP-01 validation",
        "answered an ACME TLS-ALPN-01 validation",
    );
}

#[test]
fn restart_serves_the_stored_certificate_without_a_new_order() {
    let env = TestEnv::new();
    let AcmeSetup {
        pebble,
        gateway,
        config,
    } = pebble::start(&env, Challenge::TlsAlpn01, false);
    let first = pebble.wait_served(gateway.port(), DOMAIN, ServedCert::is_pebble);
    gateway.wait_log_within(ISSUE, &["certificate issued and in service"]);
    let port = gateway.port();
    drop(gateway);

    // Same config and state (a copy of the file keeps the first run's log apart). Same ports:
    // Pebble was configured with them.
    let again_config = config.with_file_name("acme-gateway-restarted.toml");
    std::fs::copy(&config, &again_config).expect("copy config");
    let again = Gateway::start(&env, &again_config);
    assert_eq!(again.port(), port);
    // Stored certificates are installed before `ready`: the very first handshake gets it.
    let served = pebble
        .handshake(port, DOMAIN)
        .unwrap_or_else(|e| panic!("first handshake after the restart does not verify:\n{e}"));
    assert_eq!(
        served.serial, first.serial,
        "a different certificate after the restart"
    );

    // The manager has looked at the stored certificate and scheduled its renewal.
    again.wait_log_within(ISSUE, &["next certificate renewal scheduled"]);
    let log = again.stderr();
    assert!(log.contains("serving the stored ACME certificate"), "{log}");
    assert!(log.contains("using the stored ACME account"), "{log}");
    assert!(
        !log.contains("ACME order placed"),
        "a new order after the restart:\n{log}"
    );
    assert!(
        !log.contains("created an ACME account"),
        "a new account after the restart:\n{log}"
    );
    assert_eq!(
        metric(&again, ORDERS_OK).unwrap_or(0.0),
        0.0,
        "orders after the restart"
    );
}

#[test]
fn forced_renewal_is_swapped_in_while_an_earlier_connection_stays_open() {
    let env = TestEnv::new();
    let acme = pebble::start(&env, Challenge::TlsAlpn01, false);
    let gw = &acme.gateway;
    let first = wait_issued(&acme);

    // A keep-alive HTTPS connection on the first certificate.
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{}", gw.port())]);
    cmd.args([
        "-servername",
        DOMAIN,
        "-alpn",
        "http/1.1",
        "-verify_return_error",
        "-CAfile",
    ]);
    cmd.arg(&acme.pebble.root);
    let mut held = Proc::spawn(env.path(), "held-tls", cmd);
    let mut stdin = held.take_stdin().expect("s_client stdin");
    stdin.write_all(HEALTHZ).expect("first request");
    held.wait_output("HTTP/1.1 200", false, SETUP);
    let held_cert = ServedCert::from_output(&held.stdout()).expect("held connection's certificate");
    assert_eq!(held_cert.serial, first.serial);

    force_renewal(gw);
    let renewed = acme
        .pebble
        .wait_served(gw.port(), DOMAIN, |c| c.serial != first.serial);
    assert!(renewed.is_pebble(), "{renewed:?}");
    assert_eq!(renewed.dns_names, [DOMAIN]);
    assert_eq!(metric(gw, ORDERS_OK), Some(2.0), "two successful orders");

    stdin
        .write_all(HEALTHZ)
        .expect("second request on the held connection");
    let answered = poll_until(SETUP, || {
        (held.stdout().matches("HTTP/1.1 200").count() >= 2).then_some(())
    });
    assert!(
        answered.is_some() && held.try_wait().is_none(),
        "the connection opened before the renewal stopped working\n{}",
        held.describe()
    );
}

#[test]
fn on_demand_issues_a_certificate_for_a_new_tunnel_host() {
    let env = TestEnv::new();
    let acme = pebble::start(&env, Challenge::TlsAlpn01, true);
    let gw = &acme.gateway;
    let key = env.key("a", KeyKind::Ed25519);
    // Raw SSH: nothing the harness's test CA signed is served by this gateway.
    let _tunnel = gw.ssh(&key, Transport::Raw).open_tunnel("app", 80, echo_server());
    let host = key.host("app");

    // The handshake verifies the name and the chain to Pebble's root.
    let cert = acme.pebble.wait_served(gw.port(), &host, ServedCert::is_pebble);
    assert_eq!(cert.dns_names, [host.as_str()], "on-demand certificate names");
    gw.wait_log_within(ISSUE, &["no certificate covers this tunnel host: ordering one"]);
    let stored = env.path().join(format!("state/acme/{host}.crt"));
    assert!(stored.is_file(), "{} not stored", stored.display());
}

#[test]
fn failed_renewal_with_pebble_gone_keeps_the_current_certificate() {
    let env = TestEnv::new();
    let mut acme = pebble::start(&env, Challenge::TlsAlpn01, false);
    let first = wait_issued(&acme);
    acme.gateway
        .wait_log_within(ISSUE, &["certificate issued and in service"]);

    acme.pebble.stop();
    force_renewal(&acme.gateway);
    acme.gateway.wait_log_within(
        ISSUE,
        &["ACME order failed; the current certificate stays in service"],
    );

    let gw = &acme.gateway;
    let served = acme
        .pebble
        .handshake(gw.port(), DOMAIN)
        .unwrap_or_else(|e| panic!("the certificate no longer verifies after a failed renewal:\n{e}"));
    assert_eq!(
        served, first,
        "the served certificate changed after a failed renewal"
    );
    assert!(
        metric(gw, ORDERS_FAILED) >= Some(1.0),
        "{ORDERS_FAILED} not counted"
    );
    assert_eq!(metric(gw, ORDERS_OK), Some(1.0));
}
