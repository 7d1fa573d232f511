//! HTTP/2 to the tunnel (`ssh -R … gw -- upstream=h2c`): a real gRPC server and client (Python
//! grpcio, pinned, installed by `scripts/test.sh` in `target/venv`) through the gateway and a
//! real `ssh` tunnel; curl for the gateway's own deadline and an HTTP/1.1 visitor; hyper as an
//! h2c app and an h2 visitor that stops reading.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::convert::Infallible;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::{h2_ready, pattern, tls_connect};
use common::process::{run_bounded, Proc};
use common::prom::Admin;
use common::ssh::{KeyKind, SshClient, Transport};
use common::{Gateway, TestEnv, SETUP};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const PYTHON_HINT: &str = "run `bash scripts/test.sh` once (it installs grpcio into target/venv), or: \
    python3 -m venv target/venv && target/venv/bin/pip install grpcio==1.76.0, or point \
    EDGEMUX_PYTHON at a python with grpcio";

/// The python with grpcio: `EDGEMUX_PYTHON`, else the test command's virtualenv.
fn python() -> PathBuf {
    let python = std::env::var_os("EDGEMUX_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "{} cannot import grpc: {PYTHON_HINT}", python.display());
    python
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/echo.py")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ssh -R NAME:80:127.0.0.1:BACKEND gw -- upstream=h2c`, once the options are applied.
fn h2c_tunnel(client: &SshClient, name: &str, backend: u16) -> Proc {
    let spec = format!("{name}:80:127.0.0.1:{backend}");
    let holder = client.spawn("ssh-R-h2c", &["-R", &spec], &["--", "upstream=h2c"]);
    client.wait_tunnel(name, &holder);
    holder.wait_output("\"upstream\":\"h2c\"", false, SETUP);
    holder
}

fn curl(env: &TestEnv, gw: &Gateway, host: &str, args: &[&str], path: &str) -> common::process::Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&env.pki.ca)
        .args(["--resolve", &format!("{host}:{}:127.0.0.1", gw.port())])
        .args(args)
        .arg(format!("https://{host}:{}{path}", gw.port()));
    run_bounded(env.path(), "curl", cmd, SETUP)
}

#[test]
fn grpc_calls_pass_through_an_h2c_tunnel_with_status_trailers_and_deadlines() {
    common::require_tools();
    let python = python();
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let key = env.key("rpc", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let port = free_port();
    let mut serve = Command::new(&python);
    serve.arg(script()).args(["serve", &port.to_string()]);
    let server = Proc::spawn(env.path(), "grpc-server", serve);
    server.wait_output("listening", false, SETUP);
    let _tunnel = h2c_tunnel(&client, "rpc", port);
    let host = key.host("rpc");

    let mut call = Command::new(&python);
    call.arg(script())
        .args(["call", &format!("127.0.0.1:{}", gw.port()), &host])
        .arg(&env.pki.ca);
    let out = run_bounded(env.path(), "grpc-client", call, Duration::from_secs(60));
    assert!(out.status.success(), "grpc client failed:\n{}", out.combined());
    let got: Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.combined()));
    println!("grpc client: {got}");
    assert_eq!(got["unary"], "olleh");
    assert_eq!(got["unary_code"], "OK");
    assert_eq!(got["unary_trailers"]["x-echo-length"], "5", "trailing metadata");
    assert_eq!(got["fail_code"], "NOT_FOUND", "the app's status code");
    assert_eq!(got["fail_details"], "no such thing");
    assert_eq!(got["fail_trailers"]["x-why"], "asked to fail");
    let stream: Vec<String> = (0..5).map(|i| format!("message {i}")).collect();
    assert_eq!(got["stream"], serde_json::json!(stream), "server streaming");
    assert_eq!(got["stream_code"], "OK");
    assert_eq!(got["stream_trailers"]["x-sent"], "5");
    assert_eq!(
        got["concurrent_ok"], 200,
        "200 concurrent calls on one connection: {got}"
    );
    assert_eq!(got["missed_deadlines"], 120, "{got}");
    // Multiplexed: 120 abandoned calls and 200 at once rode one or two channels (100 streams
    // each): no abandoned call kept its place.
    let member = &client.find_tunnel("rpc").unwrap()["members"][0];
    let channels = member["channels"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&channels),
        "h2c channels to the member: {member}"
    );
    assert_eq!(got["deadline_code"], "DEADLINE_EXCEEDED");
    assert!(
        got["deadline_secs"].as_f64().unwrap() < 2.5,
        "the deadline was not kept: {got}"
    );

    // The gateway keeps the deadline itself: a caller that sends grpc-timeout and waits (curl)
    // gets DEADLINE_EXCEEDED from the gateway when the app is slower.
    let message = env.path().join("message.bin");
    std::fs::write(&message, b"\x00\x00\x00\x00\x01x").unwrap();
    let data = format!("@{}", message.display());
    let started = Instant::now();
    let args = [
        "--http2",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        "grpc-timeout: 400m",
        "--data-binary",
        data.as_str(),
    ];
    let out = curl(&env, &gw, &host, &args, "/edgemux.test.Echo/Slow");
    let took = started.elapsed();
    let head = out.stdout.to_ascii_lowercase();
    assert!(
        head.contains("grpc-status: 4"),
        "wanted DEADLINE_EXCEEDED from the gateway:\n{}",
        out.combined()
    );
    assert!(head.contains("edgemux"), "the gateway says who ended it:\n{head}");
    assert!(
        took < Duration::from_secs(2),
        "answered after {took:?}, the app takes 3 s"
    );

    let scrape = Admin::new(&gw, None).scrape();
    scrape.assert_at_least(
        "edgemux_tunnel_upstream_requests_total",
        &[("upstream", "h2c")],
        205.0,
    );
    drop(server);
}

/// An h2c app (hyper, prior knowledge): `/big` answers `BIG` bytes, a WebSocket over h2
/// (RFC 8441) echoes its messages, anything else answers `small`.
fn h2c_app(rt: &tokio::runtime::Runtime) -> u16 {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let service = hyper::service::service_fn(app_answer);
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder.enable_connect_protocol();
            tokio::spawn(builder.serve_connection(TokioIo::new(tcp), service));
        }
    });
    port
}

async fn app_answer(mut req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    const BIG: u64 = 8 * 1024 * 1024;
    if req.method() == hyper::Method::CONNECT {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let io = TokioIo::new(upgrade.await.expect("upgraded"));
            let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() || ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        return Ok(Response::new(Full::new(Bytes::new())));
    }
    let body = if req.uri().path() == "/big" {
        Bytes::from(pattern(BIG))
    } else {
        Bytes::from_static(b"small")
    };
    Ok(Response::new(Full::new(body)))
}

/// A gateway, and `app` served by the hyper h2c app through `ssh -R … -- upstream=h2c`.
struct H2cSite {
    env: TestEnv,
    gw: Gateway,
    client: SshClient,
    rt: tokio::runtime::Runtime,
    host: String,
    _tunnel: Proc,
}

fn h2c_site() -> H2cSite {
    common::require_tools();
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let key = env.key("h2c", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = h2c_app(&rt);
    let _tunnel = h2c_tunnel(&client, "app", app);
    let host = key.host("app");
    H2cSite {
        env,
        gw,
        client,
        rt,
        host,
        _tunnel,
    }
}

#[test]
fn a_slow_visitor_does_not_stall_other_streams_on_the_member_connection() {
    let H2cSite {
        env,
        gw,
        client,
        rt,
        host,
        _tunnel,
    } = h2c_site();

    // A visitor on HTTP/1.1 still reaches an h2c tunnel.
    let out = curl(&env, &gw, &host, &["--http1.1"], "/hello");
    assert_eq!(out.stdout, "small", "{}", out.combined());

    let (ca, port) = (env.pki.ca_der.clone(), gw.port());
    rt.block_on(async move {
        let get = |path: &str| {
            Request::get(format!("https://{host}:{port}{path}"))
                .version(Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let connect = |host: String| {
            let ca = ca.clone();
            async move {
                let tls = tls_connect(&ca, port, &host, &[b"h2"]).await;
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(65_535)
                    .initial_connection_window_size(65_535)
                    .handshake(TokioIo::new(tls))
                    .await
                    .expect("h2 handshake");
                tokio::spawn(conn);
                sender
            }
        };
        // Small windows on the visitor's side, so what it does not read piles up in the gateway.
        // The slow visitor: takes the head of an 8 MiB answer, then reads nothing.
        let mut slow = connect(host.clone()).await;
        let big = slow.send_request(get("/big")).await.expect("/big head");
        assert_eq!(big.status(), 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Others, meanwhile, on the same member connection: each answered at once.
        let mut other = connect(host.clone()).await;
        for i in 0..20 {
            let started = Instant::now();
            let resp = tokio::time::timeout(SETUP, other.send_request(get("/small")))
                .await
                .unwrap_or_else(|_| panic!("request {i} stalled behind the slow visitor"))
                .expect("an answer");
            let body = resp.into_body().collect().await.expect("a body").to_bytes();
            assert_eq!(&body[..], b"small");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "request {i} took {:?}",
                started.elapsed()
            );
        }
        // The slow visitor then reads its answer whole, byte for byte.
        let body = tokio::time::timeout(Duration::from_secs(30), big.into_body().collect())
            .await
            .expect("the big body in time")
            .expect("the big body")
            .to_bytes();
        assert!(
            body == pattern(8 * 1024 * 1024),
            "the 8 MiB answer arrived altered ({} bytes)",
            body.len()
        );
    });
    let member = &client.find_tunnel("app").unwrap()["members"][0];
    assert_eq!(member["requests"], 22, "one member served all 22: {member}");
    assert_eq!(member["channels"], 1, "all on one shared connection: {member}");
}

#[test]
fn an_rfc_8441_websocket_reaches_an_h2c_app_as_one() {
    let H2cSite {
        env,
        gw,
        client: _,
        rt,
        host,
        _tunnel,
    } = h2c_site();

    // An HTTP/1.1 Upgrade cannot be carried to an h2c app: said, not attempted.
    let args = [
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
    ];
    let out = curl(&env, &gw, &host, &args, "/ws");
    assert_eq!(out.stdout, "501", "{}", out.combined());

    let (ca, port) = (env.pki.ca_der.clone(), gw.port());
    rt.block_on(async move {
        let mut sender = h2_ready(&ca, port, &host, "/hello").await;
        let connect = Request::builder()
            .method(hyper::Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(format!("https://{host}:{port}/ws"))
            .header("sec-websocket-version", "13")
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(connect).await.expect("extended CONNECT");
        assert_eq!(resp.status(), 200, "{resp:?}");
        let upgraded = hyper::upgrade::on(resp)
            .await
            .expect("the stream carries the WebSocket");
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        for i in 0..100 {
            let msg = Message::text(format!("message {i} to an h2c app"));
            ws.send(msg.clone()).await.expect("send");
            let echoed = tokio::time::timeout(SETUP, ws.next())
                .await
                .expect("echo in time");
            assert_eq!(echoed.expect("a message").expect("no error"), msg);
        }
        ws.close(None).await.expect("close");
    });
}
