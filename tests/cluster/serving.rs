//! A tunnel held on r1 serves visitors who land on r2 and r3 (SCALEOUT T1): HTTP/1.1 and h2
//! bodies byte for byte, a WebSocket, 64 MiB each way with both replicas' memory bounded; the
//! backend sees the visitor's address in `X-Forwarded-For`, the owner's ssh client sees it as the
//! `forwarded-tcpip` originator, and r2 counts its requests with `hop="peer"`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use crate::common::backend::random_bytes;
use crate::common::cluster::{Cluster, Via, VISITOR};
use crate::common::config::GatewayBuilder;
use crate::common::http::{http_backend, pattern, pattern_sha256, rss_kib, RssSampler};
use crate::common::pki::{client_config, own_tls_server};
use crate::common::process::{poll_until, Proc};
use crate::common::prom::promtool_check;
use crate::common::ssh::KeyKind;
use crate::common::{TestEnv, SETUP};

const MIB: u64 = 1 << 20;

/// A cluster where r1 holds `app`, an HTTP tunnel to a backend `alpha`, for an ssh client that
/// logs the originator of every channel (`-v`).
struct Hopped {
    owner: Proc,
    host: String,
    cluster: Cluster,
}

fn hopped(configure: impl Fn(GatewayBuilder) -> GatewayBuilder + Send + Sync + 'static) -> Hopped {
    let env = TestEnv::new();
    let key = env.key("owner", KeyKind::Ed25519);
    let cluster = Cluster::start(env, configure);
    let spec = format!("app:80:127.0.0.1:{}", http_backend("alpha"));
    let owner = cluster
        .ssh(&key, Via::Replica(1))
        .spawn("ssh-R", &["-v", "-N", "-R", &spec], &[]);
    let host = key.host("app");
    let t = cluster.wait_placement(&host, &[("r1", 1)]);
    eprintln!("r1's tunnel listed by every replica {t:?} after its ssh client started");
    Hopped { owner, host, cluster }
}

#[test]
fn bodies_websockets_and_the_visitor_address_cross_the_hop() {
    let h = hopped(|c| c);
    for n in [2, 3] {
        let visitor = h.cluster.visitor(Via::Replica(n));
        for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let started = Instant::now();
            let got = visitor.get(&h.host, &format!("/bytes/{MIB}"), &[flag]);
            got.expect_status(200, &format!("GET via r{n} {flag}"));
            assert_eq!(got.version, version, "GET via r{n} {flag}");
            assert!(
                got.body == pattern(MIB),
                "GET via r{n} {flag}: body differs: {got:?}"
            );

            let sent = random_bytes(MIB as usize);
            let file = visitor.file("post");
            std::fs::write(&file, &sent).unwrap();
            let data = format!("@{}", file.display());
            let got = visitor.get(&h.host, "/echo", &[flag, "--data-binary", &data]);
            got.expect_status(200, &format!("POST via r{n} {flag}"));
            assert!(got.body == sent, "POST via r{n} {flag}: echo differs: {got:?}");
            eprintln!(
                "via r{n} {flag}: 1 MiB GET and 1 MiB POST in {:?}",
                started.elapsed()
            );
        }
        let got = visitor.get(&h.host, "/headers", &[]);
        let headers: Value = serde_json::from_str(&got.expect_status(200, "/headers").text()).unwrap();
        assert_eq!(
            headers["x-forwarded-for"],
            serde_json::json!([VISITOR]),
            "X-Forwarded-For at the backend, visitor via r{n}: {headers}"
        );
        websocket_echo(&h, n);
    }
    let seen = h
        .owner
        .wait_output(&format!("originator {VISITOR} port"), true, SETUP);
    let originators: Vec<&str> = seen.lines().filter(|l| l.contains("originator")).collect();
    eprintln!(
        "the owner's ssh saw {} forwarded-tcpip channels",
        originators.len()
    );
    assert!(
        originators
            .iter()
            .all(|l| l.contains(&format!("originator {VISITOR} port"))),
        "every forwarded-tcpip channel names the visitor, never a replica: {originators:#?}"
    );

    let r2 = h.cluster.scrape(2);
    let (peer, local) = (
        r2.count("edgemux_http_requests_total", &[("hop", "peer")]),
        r2.count("edgemux_http_requests_total", &[("hop", "local")]),
    );
    eprintln!("r2 counted {peer} requests with hop=peer, {local} with hop=local");
    // Via r2: two GETs, two POSTs and `/headers` (and the WebSocket upgrade, if counted).
    r2.assert_at_least("edgemux_http_requests_total", &[("hop", "peer")], 5.0);
    assert_eq!(local, 0.0, "r2 holds no tunnel: nothing is local\n{}", r2.text);
    r2.assert_at_least(
        "edgemux_peer_streams_total",
        &[("side", "out"), ("outcome", "ok")],
        1.0,
    );
    // Both ends' metrics, the cluster's included, are valid exposition format.
    let r1 = h.cluster.scrape(1);
    r1.assert_at_least(
        "edgemux_peer_streams_total",
        &[("side", "in"), ("outcome", "ok")],
        1.0,
    );
    for n in [1, 2] {
        // A keepalive late on a loaded machine may show the store down for a moment.
        let up = poll_until(SETUP, || {
            let s = h.cluster.scrape(n);
            (s.count("edgemux_cluster_store_up", &[]) == 1.0).then_some(())
        });
        assert!(up.is_some(), "r{n} never said its store is up");
    }
    for (name, scrape) in [("r1", &r1), ("r2", &r2)] {
        let check = promtool_check(h.cluster.env.path(), &scrape.text);
        assert!(
            check.status.success(),
            "promtool check metrics on {name}:\n{}\n--- scrape ---\n{}",
            check.combined(),
            scrape.text
        );
    }
}

/// A text and a 256 KiB binary message echoed through a WebSocket opened from `VISITOR` on
/// replica `n`'s pinned frontend.
fn websocket_echo(h: &Hopped, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let port = h.cluster.port(Via::Replica(n));
    let session = async {
        let started = Instant::now();
        let tls = tls_from_visitor(&h.cluster.env.pki.ca_der, port, &h.host).await;
        let url = format!("wss://{}:{port}/ws", h.host);
        let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("handshake");
        assert_eq!(resp.status(), 101, "WebSocket upgrade via r{n}");
        for msg in [
            Message::text("across the hop"),
            Message::binary(random_bytes(256 * 1024)),
        ] {
            ws.send(msg.clone()).await.expect("send");
            let echoed = ws.next().await.expect("an echo").expect("a message");
            assert!(
                echoed == msg,
                "echo via r{n} differs ({} vs {} bytes)",
                echoed.len(),
                msg.len()
            );
        }
        ws.close(None).await.expect("close");
        eprintln!("WebSocket echo via r{n} in {:?}", started.elapsed());
    };
    rt.block_on(async {
        tokio::time::timeout(SETUP, session)
            .await
            .expect("WebSocket timed out")
    });
}

/// TLS to the balancer on 127.0.0.1:`port` from `VISITOR`, for `host`, offering HTTP/1.1.
async fn tls_from_visitor(ca_der: &Path, port: u16, host: &str) -> TlsStream<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(VISITOR.parse().unwrap(), 0)).unwrap();
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let config = client_config(ca_der, vec![b"http/1.1".to_vec()]);
    let name = ServerName::try_from(host.to_owned()).unwrap();
    TlsConnector::from(config).connect(name, tcp).await.unwrap()
}

const BULK: u64 = 64 * MIB;
/// Each replica's buffer share per client, set low so the memory bound below is tight.
const SHARE: u64 = 8 * MIB;
/// How far a replica's RSS may rise above its resting figure while 64 MiB cross it: what the
/// budget lets one visitor pin (`SHARE`), the TLS, hyper and peer-link copy buffers of a
/// transfer (under 1 MiB), and allocator slack (16 MiB, as in the memory budget tests). Well
/// under the 64 MiB a replica holding the body would need.
const GROWTH_BOUND: u64 = SHARE + 24 * MIB;

#[test]
fn sixty_four_mib_each_way_through_the_hop_with_bounded_memory() {
    let h = hopped(|c| c.limit("client_buffer_share", SHARE as i64));
    let visitor = h.cluster.visitor(Via::Replica(2));
    visitor
        .get(&h.host, "/", &[])
        .expect_status(200, "warm-up through the hop");
    let pids = [h.cluster.replica(1).pid(), h.cluster.replica(2).pid()];
    let resting: Vec<u64> = pids.iter().map(|&p| rss_kib(p).unwrap()).collect();
    let samplers: Vec<RssSampler> = pids.iter().map(|&p| RssSampler::start(p)).collect();

    let limit = Duration::from_secs(60);
    let started = Instant::now();
    let (curl, hash) = visitor.download_sha256(&h.host, &format!("/bytes/{BULK}"), limit);
    let down = started.elapsed();
    assert_eq!(curl, format!("200 {BULK}"), "download status and size");
    assert_eq!(hash, pattern_sha256(BULK), "hash of the download");

    let started = Instant::now();
    let (status, body) = visitor.upload_pattern(&h.host, "/upload", BULK, limit);
    let up = started.elapsed();
    assert_eq!(status, 200, "upload status: {body}");
    let reply: Value = serde_json::from_str(&body).expect("upload reply is JSON");
    assert_eq!(reply["len"], BULK, "bytes the backend received: {reply}");
    assert_eq!(reply["sha256"], pattern_sha256(BULK), "hash at the backend");

    let peaks: Vec<(u64, usize)> = samplers.into_iter().map(RssSampler::peak).collect();
    let rate = |t: Duration| BULK as f64 / MIB as f64 / t.as_secs_f64();
    eprintln!(
        "64 MiB through r2 -> r1: down in {down:?} ({:.0} MiB/s), up in {up:?} ({:.0} MiB/s); \
         RSS r1 resting {} KiB peak {} KiB, r2 resting {} KiB peak {} KiB (growth bound {} KiB)",
        rate(down),
        rate(up),
        resting[0],
        peaks[0].0,
        resting[1],
        peaks[1].0,
        GROWTH_BOUND / 1024
    );
    for (i, (name, (peak, samples))) in ["r1", "r2"].iter().zip(peaks).enumerate() {
        assert!(samples >= 5, "{name}: too few RSS samples ({samples})");
        let growth = peak.saturating_sub(resting[i]);
        assert!(
            growth * 1024 <= GROWTH_BOUND,
            "{name}: RSS rose {growth} KiB over its resting {} KiB (bound {} KiB)",
            resting[i],
            GROWTH_BOUND / 1024
        );
    }
}

/// Access rules are read where the HTTP request is, and only the replica holding the ssh
/// connection has them: a tunnel with rules is never opened to a peer unchecked.
#[test]
fn a_tunnel_with_access_rules_is_served_only_by_its_own_replica() {
    let env = TestEnv::new();
    let key = env.key("owner", KeyKind::Ed25519);
    let cluster = Cluster::start(env, |c| c);
    let spec = format!("app:80:127.0.0.1:{}", http_backend("alpha"));
    let _owner =
        cluster
            .ssh(&key, Via::Replica(1))
            .spawn("ssh-R-auth", &["-R", &spec], &["--", "auth=alice:s3cret"]);
    let host = key.host("app");
    cluster.wait_placement(&host, &[("r1", 1)]);
    let on_r1 = cluster.visitor(Via::Replica(1));
    on_r1
        .get(&host, "/id", &[])
        .expect_status(401, "r1 asks for credentials");
    on_r1
        .get(&host, "/id", &["-u", "alice:s3cret"])
        .expect_status(200, "r1 serves with them");
    let via_r2 = cluster
        .visitor(Via::Replica(2))
        .get(&host, "/id", &["-u", "alice:s3cret"]);
    via_r2.expect_status(
        502,
        "r2 cannot check the rules, and r1 does not open the tunnel to it",
    );
}

/// The operator's forward_auth guards every tunnel on every replica: a visitor landing on r2
/// for r1's tunnel is asked too.
#[test]
fn forward_auth_guards_a_tunnel_reached_through_another_replica() {
    let env = TestEnv::new();
    let key = env.key("owner", KeyKind::Ed25519);
    let auth = crate::common::http::auth_service();
    let cluster = Cluster::start(env, move |c| {
        c.set("http.forward_auth.url", format!("http://127.0.0.1:{auth}/auth"))
            .set("http.forward_auth.response_headers", vec!["X-Auth-Request-User"])
    });
    let spec = format!("app:80:127.0.0.1:{}", http_backend("alpha"));
    let _owner = cluster
        .ssh(&key, Via::Replica(1))
        .spawn("ssh-R", &["-N", "-R", &spec], &[]);
    let host = key.host("app");
    cluster.wait_placement(&host, &[("r1", 1)]);
    let via_r2 = cluster.visitor(Via::Replica(2));
    via_r2
        .get(&host, "/id", &[])
        .expect_status(302, "no session: sent to the login page on r2 too");
    let passed = via_r2.get(&host, "/headers", &["-H", "Cookie: sso=alice"]);
    passed.expect_status(200, "a session, through the hop");
    let seen: Value = serde_json::from_slice(&passed.body).unwrap();
    assert_eq!(
        seen["x-auth-request-user"],
        serde_json::json!(["alice"]),
        "{seen}"
    );
}

/// An `upstream=h2c` tunnel on r1 is served through r2 too: r1 publishes how its app is spoken
/// to once the options arrive, and r2 speaks HTTP/2 to it across the peer link.
#[test]
fn an_h2c_tunnel_is_served_through_another_replica() {
    let env = TestEnv::new();
    let key = env.key("owner", KeyKind::Ed25519);
    let cluster = Cluster::start(env, |c| c);
    let spec = format!("app:80:127.0.0.1:{}", crate::common::http::h2c_backend("alpha"));
    let _owner =
        cluster
            .ssh(&key, Via::Replica(1))
            .spawn("ssh-R-h2c", &["-R", &spec], &["--", "upstream=h2c"]);
    let host = key.host("app");
    cluster.wait_placement(&host, &[("r1", 1)]);
    let via_r2 = cluster.visitor(Via::Replica(2));
    let started = Instant::now();
    let answered = poll_until(SETUP, || {
        let got = via_r2.get(&host, "/id", &[]);
        (got.status == 200).then(|| got.text())
    });
    assert_eq!(
        answered.as_deref(),
        Some("h2c alpha"),
        "r2 never spoke HTTP/2 to r1's h2c tunnel"
    );
    eprintln!(
        "h2c through the hop: served via r2 {:?} after placement",
        started.elapsed()
    );
    cluster.scrape(2).assert_at_least(
        "edgemux_tunnel_upstream_requests_total",
        &[("upstream", "h2c")],
        1.0,
    );
    let listed = cluster.tunnels(2).to_string();
    assert!(listed.contains(&host), "{listed}");
}

/// A `tls=passthrough` tunnel on r1 is reached through r2: r2 reads the route's `passthrough`,
/// does not terminate the ClientHello and splices it across the peer link; r1 checks the
/// tunnel's `allow=` against the visitor's address carried in the peer header.
#[test]
fn a_passthrough_tunnel_is_served_through_another_replica_with_its_allow_list() {
    let env = TestEnv::new();
    let key = env.key("owner", KeyKind::Ed25519);
    let cluster = Cluster::start(env, |c| c);
    let (open, closed) = (key.host("open"), key.host("closed"));
    let body = pattern(256 * 1024);
    let dir = cluster.env.path();
    let (_open_app, open_port, open_ca) = own_tls_server(&dir.join("open-app"), &open, &body);
    let (_closed_app, closed_port, closed_ca) = own_tls_server(&dir.join("closed-app"), &closed, &body);
    let ssh = cluster.ssh(&key, Via::Replica(1));
    let allow_visitor = format!("allow={VISITOR}");
    let _open = ssh.spawn(
        "ssh-R-open",
        &["-R", &format!("open:443:127.0.0.1:{open_port}")],
        &["--", "tls=passthrough", &allow_visitor],
    );
    let _closed = ssh.spawn(
        "ssh-R-closed",
        &["-R", &format!("closed:443:127.0.0.1:{closed_port}")],
        &["--", "tls=passthrough", "allow=10.9.9.9"],
    );
    cluster.wait_placement(&open, &[("r1", 1)]);
    cluster.wait_placement(&closed, &[("r1", 1)]);
    let via_r2 = cluster.visitor(Via::Replica(2)).trusting(&open_ca);
    let started = Instant::now();
    let got = poll_until(SETUP, || {
        let got = via_r2.get(&open, "/body.bin", &[]);
        (got.status == 200).then_some(got.body)
    });
    let got = got.unwrap_or_else(|| panic!("r2 never passed {open}'s TLS through to r1"));
    assert!(got == body, "the body arrived altered ({} bytes)", got.len());
    eprintln!(
        "passthrough through the hop: served via r2 {:?} after placement",
        started.elapsed()
    );
    // Outside allow=: r1 refuses (counted there), whenever r2 first knows the host.
    let closed_visitor = cluster.visitor(Via::Replica(2)).trusting(&closed_ca);
    let refusal = poll_until(SETUP, || {
        let got = closed_visitor.get(&closed, "/body.bin", &[]);
        assert_ne!(got.status, 200, "r1 let in a visitor outside allow= through r2");
        let refused = cluster
            .scrape(1)
            .count("edgemux_access_refusals_total", &[("reason", "allow")]);
        (refused >= 1.0).then_some(())
    });
    assert!(refusal.is_some(), "r1 never refused the visitor outside allow=");
    // HTTP for the passthrough host with another SNI, on r2: 421, never sent on as HTTP.
    let misdirected =
        cluster
            .visitor(Via::Replica(2))
            .get(&key.host("other"), "/", &["-H", &format!("Host: {open}")]);
    misdirected.expect_status(421, "HTTP for a passthrough host held on r1");
}
