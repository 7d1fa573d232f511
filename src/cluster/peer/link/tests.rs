//! The peer link end to end on loopback: both ends, real TLS, the handler seam.
#![allow(clippy::unwrap_used, clippy::panic)]
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{PeerClient, PeerError};
use super::frame::{now_ms, read_frame};
use super::server::{Dialing, Killing, Looking, PeerHandler, PeerServer};
use crate::cluster::peer::codec::{self, CodecError, Op, PeerRequest};
use crate::cluster::peer::secret::{ClusterSecret, Label};
use crate::cluster::peer::status::{self, Reply, Status, MAX_REPLY};
use crate::cluster::peer::tls::tests::{impostor, secret};
use crate::cluster::peer::tls::{self, PeerTls};
use crate::io::BoxStream;

/// The owner replica's id in these tests; the dialer is `r2.b`.
const OWNER: &str = "r1.a";
const MISSING: &str = "missing.gw.test";

/// A handler that greets and then echoes, except for [`MISSING`], which it does not hold.
#[derive(Default)]
struct Echo {
    calls: AtomicUsize,
}

impl PeerHandler for Echo {
    fn dial<'a>(&'a self, req: &'a PeerRequest) -> Dialing<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if req.host() == MISSING {
                return Err((Status::NoRoute, "no tunnel for this host here".to_owned()));
            }
            let (near, far) = tokio::io::duplex(64 * 1024);
            let greeting = format!("hello {} from {}\n", req.host(), req.source());
            // Errors end the echo: the dialer may have given up on the stream (a test that
            // cuts the link leaves some behind).
            tokio::spawn(async move {
                let (mut rd, mut wr) = tokio::io::split(far);
                wr.write_all(greeting.as_bytes()).await?;
                tokio::io::copy(&mut rd, &mut wr).await?;
                wr.shutdown().await
            });
            Ok(Box::new(near) as BoxStream)
        })
    }

    fn kill<'a>(&'a self, req: &'a PeerRequest) -> Killing<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            // Nothing to close is not an error: the connections may have left already.
            Ok(if req.host() == MISSING { 0 } else { 2 })
        })
    }

    fn lookup<'a>(&'a self, req: &'a PeerRequest) -> Looking<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match req.host() {
                MISSING => Err((Status::NoRoute, "no tunnel for this host here".to_owned())),
                host => Ok(format!("route of {host}")),
            }
        })
    }

    fn store_up(&self) -> bool {
        true
    }

    fn list(&self) -> Vec<u8> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        b"a.gw.test {}\nb.gw.test {}\n".to_vec()
    }
}

/// A running owner: its address and its handler.
async fn owner() -> (SocketAddr, Arc<Echo>) {
    let (addr, handler, _) = owner_at("127.0.0.1:0".parse().unwrap()).await;
    (addr, handler)
}

/// An owner on `addr`, and the token that stops it.
async fn owner_at(addr: SocketAddr) -> (SocketAddr, Arc<Echo>, CancellationToken) {
    owner_with(addr, PeerTls::derived(&secret(1), OWNER).unwrap()).await
}

/// An owner on `addr` with `tls`.
async fn owner_with(addr: SocketAddr, tls: PeerTls) -> (SocketAddr, Arc<Echo>, CancellationToken) {
    let secret = secret(1);
    let handler = Arc::new(Echo::default());
    let server = Arc::new(PeerServer::new(
        &tls,
        &secret,
        handler.clone(),
        Duration::from_secs(5),
    ));
    // A stopped owner's listener closes as its task ends: its port is free shortly after.
    let started = Instant::now();
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if started.elapsed() > Duration::from_secs(5) => panic!("bind {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let tasks = (stop.clone(), TaskTracker::new());
    tokio::spawn(server.run(listener, Arc::new(Semaphore::new(64)), tasks));
    (addr, handler, stop)
}

/// Polls `done` every few milliseconds until it holds, or panics after 5 s.
async fn eventually(what: &str, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: not within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

/// A dialer whose TLS comes from `tls` and whose HMAC key from `secret`.
fn dialer(tls: &PeerTls, secret: &ClusterSecret) -> PeerClient {
    PeerClient::new(tls, secret, Duration::from_secs(1), Duration::from_secs(5))
}

fn replica(rid: &str) -> PeerClient {
    dialer(&PeerTls::derived(&secret(1), rid).unwrap(), &secret(1))
}

fn request(host: &str) -> PeerRequest {
    let visitor = "198.51.100.7:51234".parse().unwrap();
    PeerRequest::dial(Op::DialHttp, host, 80, visitor, "10.0.0.1:443".parse().unwrap()).unwrap()
}

/// The process's metrics, installed once for every test here.
fn recorded() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| crate::metrics::install().unwrap())
}

/// The value of a counter series, e.g. `edgemux_peer_auth_failures_total{reason="hmac"}`.
fn counter(series: &str) -> u64 {
    let text = recorded().render();
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok());
    value.unwrap_or(0.0) as u64
}

async fn refused(client: &PeerClient, addr: SocketAddr, rid: &str, req: PeerRequest) -> PeerError {
    match client.open(addr, rid, req).await {
        Ok(_) => panic!("a stream was opened"),
        Err(e) => e,
    }
}

fn auth_failures(reason: &str) -> u64 {
    counter(&format!(
        "edgemux_peer_auth_failures_total{{reason=\"{reason}\"}}"
    ))
}

#[tokio::test]
async fn bytes_round_trip_both_ways_and_each_direction_closes_on_its_own() {
    recorded();
    let (addr, handler) = owner().await;
    let client = replica("r2.b");
    let started = Instant::now();
    let stream = client.open(addr, OWNER, request("app.gw.test")).await.unwrap();
    let first_open = started.elapsed();
    let greeting = b"hello app.gw.test from 198.51.100.7:51234\n".to_vec();
    let data: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), greeting.len() + data.len());
    assert!(
        got.starts_with(&greeting),
        "the owner's first bytes arrive right after OK"
    );
    assert_eq!(&got[greeting.len()..], &data[..]);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);

    // Open latency on loopback, handshake included (no pool).
    let rounds = 20u32;
    let started = Instant::now();
    for _ in 0..rounds {
        drop(client.open(addr, OWNER, request("app.gw.test")).await.unwrap());
    }
    eprintln!(
        "peer stream open on loopback: first {first_open:?}, then {:?} on average",
        started.elapsed() / rounds
    );
    assert!(counter("edgemux_peer_streams_total{side=\"out\",outcome=\"ok\"}") >= 21);
}

#[tokio::test]
async fn a_certificate_from_a_foreign_ca_is_refused_in_the_handshake() {
    recorded();
    let (addr, handler) = owner().await;
    let before = auth_failures("tls");
    // It trusts our CA and knows the HMAC key; its own certificate is from another CA.
    let client = dialer(&impostor(&secret(1), &secret(2), "r2.b"), &secret(1));
    let err = refused(&client, addr, OWNER, request("app.gw.test")).await;
    assert!(matches!(err, PeerError::Tls(_)), "{err}");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 0);
    assert_eq!(auth_failures("tls"), before + 1);
    // A replica of another cluster does not even trust us.
    let stranger = dialer(&PeerTls::derived(&secret(2), "r2.b").unwrap(), &secret(2));
    let err = refused(&stranger, addr, OWNER, request("app.gw.test")).await;
    assert!(matches!(err, PeerError::Tls(_)), "{err}");
}

#[tokio::test]
async fn a_bad_hmac_is_refused_with_auth_and_counted() {
    recorded();
    let (addr, handler) = owner().await;
    let before = auth_failures("hmac");
    let client = dialer(&PeerTls::derived(&secret(1), "r2.b").unwrap(), &secret(3));
    let err = refused(&client, addr, OWNER, request("app.gw.test")).await;
    assert!(
        matches!(&err, PeerError::Auth(reason) if reason.contains("hmac")),
        "{err}"
    );
    assert_eq!(handler.calls.load(Ordering::SeqCst), 0);
    assert_eq!(auth_failures("hmac"), before + 1);
}

/// Sends `header` on a new connection as replica r2 and reads the reply.
async fn send_raw(addr: SocketAddr, header: &[u8]) -> Reply {
    let tls = PeerTls::derived(&secret(1), "r2.b").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    let mut stream = connector
        .connect(tls::server_name(OWNER).unwrap(), tcp)
        .await
        .unwrap();
    stream.write_all(header).await.unwrap();
    let reply = read_frame(&mut stream, MAX_REPLY, status::reply_wanted, status::parse_reply).await;
    reply.ok().unwrap()
}

fn signed(timestamp_ms: u64, nonce: [u8; 16]) -> Vec<u8> {
    let req = request("app.gw.test")
        .stamped("r2.b", timestamp_ms, nonce)
        .unwrap();
    codec::encode_request(&req, &codec::hmac_key(&secret(1).derive(Label::PeerHmac)))
}

#[tokio::test]
async fn a_replayed_or_stale_header_is_refused_with_auth_and_counted() {
    recorded();
    let (addr, handler) = owner().await;
    let (replays, clocks) = (auth_failures("replay"), auth_failures("clock"));
    let header = signed(now_ms(), [0xab; 16]);
    assert_eq!(send_raw(addr, &header).await.status, Status::Ok);
    let again = send_raw(addr, &header).await;
    assert_eq!(
        (again.status, again.reason.as_str()),
        (Status::Auth, "header refused: replay")
    );
    assert_eq!(auth_failures("replay"), replays + 1);
    let old = send_raw(addr, &signed(now_ms() - 61_000, [0xcd; 16])).await;
    assert_eq!(
        (old.status, old.reason.as_str()),
        (Status::Auth, "header refused: clock")
    );
    assert_eq!(auth_failures("clock"), clocks + 1);
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        1,
        "only the first reached the handler"
    );
}

#[tokio::test]
async fn a_refusal_reaches_the_dialer_before_any_byte_is_sent() {
    recorded();
    let (addr, handler) = owner().await;
    let before = counter("edgemux_peer_streams_total{side=\"in\",outcome=\"no_route\"}");
    let client = replica("r2.b");
    let err = refused(&client, addr, OWNER, request(MISSING)).await;
    assert!(
        matches!(&err, PeerError::NoRoute(reason) if reason == "no tunnel for this host here"),
        "{err}"
    );
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
    // The owner counts the stream once its reply is out, so maybe just after the dialer read it
    // (other tests here count refusals too: at least ours).
    eventually("the refusal counted", || {
        counter("edgemux_peer_streams_total{side=\"in\",outcome=\"no_route\"}") > before
    })
    .await;
    // A list is answered with the handler's lines after the OK, read to the end, and refused
    // by a dialer whose limit it passes.
    let visitor = "198.51.100.7:1".parse().unwrap();
    let list = || PeerRequest::dial(Op::List, "app.gw.test", 0, visitor, visitor).unwrap();
    let (rid, body) = client.fetch_any(addr, list(), 1024).await.unwrap();
    assert_eq!(
        (rid.as_str(), &body[..]),
        (OWNER, &b"a.gw.test {}\nb.gw.test {}\n"[..])
    );
    let err = client.fetch_any(addr, list(), 10).await.unwrap_err();
    assert!(matches!(err, PeerError::Protocol(CodecError::TooLong)), "{err}");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    // A ping is answered with the owner's store health, without the handler's dial.
    let ping = PeerRequest::dial(Op::Ping, "app.gw.test", 0, visitor, visitor).unwrap();
    let health = client.command(addr, OWNER, ping).await.unwrap();
    assert_eq!(health, "store=up");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn warm_connections_are_kept_ready_and_a_dead_one_is_replaced_by_a_new_dial() {
    recorded();
    let (addr, first, stop) = owner_at("127.0.0.1:0".parse().unwrap()).await;
    let client = replica("r2.b");
    drop(client.open(addr, OWNER, request("app.gw.test")).await.unwrap());
    let filled = eventually("two warm connections", || client.warm(addr, OWNER) == 2).await;
    eprintln!("warm pool filled in {filled:?}");
    // Opens from the warm pool: one handshake fewer each.
    let rounds = 20u32;
    let started = Instant::now();
    for _ in 0..rounds {
        drop(client.open(addr, OWNER, request("app.gw.test")).await.unwrap());
    }
    eprintln!(
        "peer stream open with a warm pool: {:?} on average",
        started.elapsed() / rounds
    );
    eventually("the pool refilled", || client.warm(addr, OWNER) == 2).await;
    // The owner restarts: its warm connections die, and the next open dials anew.
    stop.cancel();
    let calls = first.calls.load(Ordering::SeqCst);
    let (_, second, _stop) = owner_at(addr).await;
    let stream = client.open(addr, OWNER, request("app.gw.test")).await.unwrap();
    drop(stream);
    assert_eq!(second.calls.load(Ordering::SeqCst), 1, "the new owner served it");
    assert_eq!(first.calls.load(Ordering::SeqCst), calls);
}

/// A TCP relay to `target` that a test can cut like a partition: while `cut` holds, new
/// connections are accepted and held, and bytes on the old ones stop moving (nothing is
/// closed, so no side sees a FIN or a RST).
async fn relay(target: SocketAddr, cut: tokio::sync::watch::Receiver<bool>) -> SocketAddr {
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut cut: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if cut.wait_for(|cut| !cut).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((near, _)) = listener.accept().await {
            if *cut.borrow() {
                held.push(near);
                continue;
            }
            let far = tokio::net::TcpStream::connect(target).await.unwrap();
            let ((nr, nw), (fr, fw)) = (near.into_split(), far.into_split());
            tokio::spawn(pump(nr, fw, cut.clone()));
            tokio::spawn(pump(fr, nw, cut.clone()));
        }
    });
    addr
}

#[tokio::test]
async fn a_peer_cut_off_fails_within_the_connect_timeout_even_on_a_warm_connection() {
    recorded();
    let (owner_addr, _handler) = owner().await;
    let (cut, cut_rx) = tokio::sync::watch::channel(false);
    let addr = relay(owner_addr, cut_rx).await;
    let connect_timeout = Duration::from_millis(300);
    let client = PeerClient::new(
        &PeerTls::derived(&secret(1), "r2.b").unwrap(),
        &secret(1),
        connect_timeout,
        Duration::from_secs(5),
    );
    drop(client.open(addr, OWNER, request("app.gw.test")).await.unwrap());
    eventually("two warm connections", || client.warm(addr, OWNER) == 2).await;
    cut.send(true).unwrap();
    // Two opens take the warm connections, whose status never comes; the third dials.
    for round in ["warm", "warm", "fresh"] {
        let started = Instant::now();
        let e = refused(&client, addr, OWNER, request("app.gw.test")).await;
        let took = started.elapsed();
        eprintln!("open on a {round} connection to a cut-off peer: {e} after {took:?}");
        assert!(matches!(e, PeerError::Timeout("connect")), "{round}: {e}");
        assert!(
            took < connect_timeout + Duration::from_millis(200),
            "{round}: {took:?}"
        );
    }
    cut.send(false).unwrap();
    drop(client.open(addr, OWNER, request("app.gw.test")).await.unwrap());
}

/// A CA of the operator's and two leaves it signs (named as the operator likes), and one
/// leaf of another CA, as files under `dir`.
fn operator_files(dir: &std::path::Path) -> [tls::PeerTlsFiles; 3] {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca = |tag: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{tag}-ca.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (Issuer::new(params, key), path)
    };
    let leaf = |issuer: &Issuer<'_, KeyPair>, ca: &std::path::Path, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, issuer).unwrap();
        let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        tls::PeerTlsFiles {
            ca: ca.to_owned(),
            cert: cert_path,
            key: key_path,
        }
    };
    let (ours, ours_path) = ca("ours");
    let (theirs, theirs_path) = ca("theirs");
    let _ = theirs_path;
    [
        leaf(&ours, &ours_path, "edge-a.internal"),
        leaf(&ours, &ours_path, "edge-b.internal"),
        // Trusts our CA, but its own certificate is from another one.
        leaf(&theirs, &ours_path, "edge-x.internal"),
    ]
}

#[tokio::test]
async fn certificates_from_files_authenticate_both_ends_whatever_their_names() {
    recorded();
    let dir = tempfile::tempdir().unwrap();
    let [a, b, stranger] = operator_files(dir.path());
    let owner_tls = PeerTls::from_files(&a, OWNER).unwrap();
    let (addr, handler, _stop) = owner_with("127.0.0.1:0".parse().unwrap(), owner_tls).await;
    let client = dialer(&PeerTls::from_files(&b, "r2.b").unwrap(), &secret(1));
    let stream = client.open(addr, OWNER, request("app.gw.test")).await.unwrap();
    drop(stream);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
    let err = refused(
        &dialer(&PeerTls::from_files(&stranger, "r3.c").unwrap(), &secret(1)),
        addr,
        OWNER,
        request("app.gw.test"),
    )
    .await;
    assert!(matches!(err, PeerError::Tls(_)), "{err}");
    // A replica with derived certificates trusts neither end.
    let err = refused(&replica("r2.b"), addr, OWNER, request("app.gw.test")).await;
    assert!(matches!(err, PeerError::Tls(_)), "{err}");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
    // A missing file names its key.
    let mut missing = a.clone();
    missing.key = dir.path().join("nope.key");
    let e = PeerTls::from_files(&missing, OWNER).unwrap_err().to_string();
    assert!(e.starts_with("cluster.peer.key "), "{e}");
}

#[tokio::test]
async fn a_kill_and_a_lookup_are_answered_with_no_stream() {
    recorded();
    let (addr, handler) = owner().await;
    let client = replica("r2.b");
    let kill = |host: &str| {
        let visitor = "10.0.0.9:0".parse().unwrap();
        PeerRequest::dial(Op::Kill, host, 0, visitor, visitor).unwrap()
    };
    let closed = client.command(addr, OWNER, kill("app.gw.test")).await.unwrap();
    assert_eq!(closed, "2");
    assert_eq!(client.command(addr, OWNER, kill(MISSING)).await.unwrap(), "0");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 2);
    let lookup = |host: &str| {
        let visitor = "10.0.0.9:0".parse().unwrap();
        PeerRequest::dial(Op::Lookup, host, 0, visitor, visitor).unwrap()
    };
    let route = client.command(addr, OWNER, lookup("app.gw.test")).await.unwrap();
    assert_eq!(route, "route of app.gw.test");
    let err = client.command(addr, OWNER, lookup(MISSING)).await.unwrap_err();
    assert!(matches!(err, PeerError::NoRoute(_)), "{err}");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 4);
    // A kill signed with another key never reaches the handler.
    let forger = dialer(&PeerTls::derived(&secret(1), "r3.c").unwrap(), &secret(3));
    let err = forger
        .command(addr, OWNER, kill("app.gw.test"))
        .await
        .unwrap_err();
    assert!(matches!(err, PeerError::Auth(_)), "{err}");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn the_dialer_reaches_the_replica_it_meant_or_says_why_not() {
    recorded();
    let (addr, _) = owner().await;
    let client = replica("r2.b");
    let err = refused(&client, addr, "r9.z", request("app.gw.test")).await;
    assert!(matches!(err, PeerError::WrongPeer(_)), "{err}");
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = refused(&client, closed, OWNER, request("app.gw.test")).await;
    assert!(matches!(err, PeerError::Connect(_)), "{err}");
    assert_eq!(err.reason(), "connect_error");
    let err = refused(&client, addr, "R9", request("app.gw.test")).await;
    assert!(matches!(err, PeerError::Request(_)), "{err}");
}
