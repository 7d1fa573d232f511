//! The peer listener from outside (SCALEOUT T13, black box): it speaks only mutual TLS with
//! ALPN `edgemux-peer/1`, so a client without a certificate, or with one from another CA, is
//! refused in the handshake and counted as `edgemux_peer_auth_failures_total{reason="tls"}`
//! (the foreign one: a client certificate from the CA of the public certificate);
//! and the public round-robin frontend never reaches a peer listener, whatever ALPN a client
//! offers. A foreign CA, a bad HMAC and a replayed header are unit-tested in
//! `src/cluster/peer/link`.

use std::process::Command;
use std::time::Duration;

use crate::common::cluster::{Cluster, Via, REPLICAS};
use crate::common::pki::client_leaf;
use crate::common::process::{run_bounded, Output};
use crate::common::{TestEnv, DOMAIN};
use crate::until;

const PEER_ALPN: &str = "edgemux-peer/1";
/// A refused handshake ends in milliseconds; a listener that let the client in would leave it
/// waiting for data, which this bound turns into a failure.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// `openssl s_client` to 127.0.0.1:`port` offering the peer ALPN for `server_name`, with
/// `extra` arguments; reads until the server closes (`-ign_eof`).
fn s_client(cluster: &Cluster, port: u16, server_name: &str, extra: &[&str]) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-ign_eof", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-alpn", PEER_ALPN, "-servername", server_name])
        .args(extra);
    run_bounded(cluster.env.path(), "s_client", cmd, HANDSHAKE)
}

/// `reason="tls"` peer authentication failures replica `n` has counted.
fn tls_failures(cluster: &Cluster, n: usize) -> f64 {
    cluster
        .scrape(n)
        .count("edgemux_peer_auth_failures_total", &[("reason", "tls")])
}

/// Asserts the server ended the handshake with `alert` (as openssl names it), and that r1
/// counted it, reaching `failures` in all.
fn assert_refused(cluster: &Cluster, out: &Output, what: &str, alert: &str, failures: f64) {
    let said: Vec<&str> = out.stderr.lines().filter(|l| l.contains("alert")).collect();
    eprintln!("{what}: openssl said {said:?}");
    assert!(
        said.iter().any(|l| l.contains(alert)),
        "{what}: expected the alert {alert:?}:\n{}",
        out.combined()
    );
    let t = until(
        &format!("{what}: counted as a tls failure"),
        Duration::from_secs(2),
        || tls_failures(cluster, 1) == failures,
        || cluster.scrape(1).text,
    );
    eprintln!("{what}: refused and counted in {t:?}");
}

#[test]
fn the_peer_port_refuses_clients_without_a_cluster_certificate_and_is_never_public() {
    let env = TestEnv::new();
    let cluster = Cluster::start(env, |c| c);
    let peer = cluster.replica(1).peer_port();
    let before = tls_failures(&cluster, 1);

    let bare = s_client(&cluster, peer, "r1.peer.edgemux.invalid", &[]);
    assert_refused(
        &cluster,
        &bare,
        "no client certificate",
        "certificate required",
        before + 1.0,
    );

    let client = client_leaf(&cluster.env.pki, "stranger", "9");
    let (cert, key) = (
        client.chain.display().to_string(),
        client.key.display().to_string(),
    );
    let foreign = s_client(
        &cluster,
        peer,
        "r1.peer.edgemux.invalid",
        &["-cert", &cert, "-key", &key],
    );
    assert_refused(
        &cluster,
        &foreign,
        "a certificate from another CA",
        "unknown ca",
        before + 2.0,
    );

    // Through the public frontend, one connection per replica in the rotation: the peer ALPN
    // reaches the public TLS stage, never a peer listener.
    let counters = |n: usize| {
        let s = cluster.scrape(n);
        (
            s.count("edgemux_peer_streams_total", &[("side", "in")]),
            s.count("edgemux_peer_auth_failures_total", &[]),
        )
    };
    let seen: Vec<(f64, f64)> = (1..=REPLICAS).map(counters).collect();
    for _ in 0..REPLICAS {
        let out = s_client(&cluster, cluster.port(Via::Public), DOMAIN, &[]);
        assert!(
            !out.combined().contains("peer.edgemux.invalid"),
            "a peer certificate was served on the public frontend:\n{}",
            out.combined()
        );
    }
    let now: Vec<(f64, f64)> = (1..=REPLICAS).map(counters).collect();
    assert_eq!(
        now, seen,
        "the public frontend reached a peer listener (streams in, auth failures)"
    );
}
