//! The HTTP side of the tests: a real HTTP/1.1 backend for tunnels to point at (hyper on its own
//! runtime), `curl` as the visitor, a deterministic byte stream to move and check large bodies
//! without holding them, the gateway's RSS, and a rustls client that trusts the test CA.
//!
//! Backend routes: `/` and `/id` answer the backend's id; `/headers` echoes the request headers
//! as JSON (`{"name": ["value", ...]}`); `/echo` returns the request body; `/bytes/N` streams N
//! bytes of the pattern; `/upload` reads the body as it streams and answers
//! `{"len": N, "sha256": HEX}`; `/sleep/MS` waits before its headers; `/ws` is a WebSocket echo.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use aws_lc_rs::digest;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::process::{run_bounded, Proc};
use super::{Gateway, TestEnv, SETUP};

/// Period of the generated stream: a prime, so a lost, repeated or reordered chunk of any usual
/// (power-of-two) size no longer lines up with the pattern.
const PERIOD: usize = 1_048_573;
/// Size of the chunks the backend streams.
const CHUNK: usize = 64 * 1024;

/// One period of the pattern, from a fixed-seed splitmix64.
fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut state = 0x5eed_u64;
        let mut out = Vec::with_capacity(PERIOD + 8);
        while out.len() < PERIOD {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(PERIOD);
        out
    })
}

/// The first `len` bytes of the pattern, as chunks no larger than `CHUNK` (lazily).
pub fn pattern_chunks(len: u64) -> impl Iterator<Item = &'static [u8]> + Send {
    let mut pos = 0u64;
    std::iter::from_fn(move || {
        let start = usize::try_from(pos % PERIOD as u64).ok()?;
        let left = usize::try_from(len - pos).unwrap_or(usize::MAX);
        let n = CHUNK.min(left).min(PERIOD - start);
        pos += n as u64;
        (n > 0).then(|| &block()[start..start + n])
    })
}

/// The first `len` bytes of the pattern, for small bodies.
pub fn pattern(len: u64) -> Vec<u8> {
    pattern_chunks(len).flatten().copied().collect()
}

/// Lowercase hex SHA-256 of the first `len` bytes of the pattern.
pub fn pattern_sha256(len: u64) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    pattern_chunks(len).for_each(|c| ctx.update(c));
    data_encoding::HEXLOWER.encode(ctx.finish().as_ref())
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp
}

/// Binds `127.0.0.1:0` and hands every accepted connection to `serve` (called within a runtime
/// of its own, so it may spawn), in a thread that lives until the test process ends; returns the
/// port.
fn spawn_backend(serve: impl Fn(tokio::net::TcpStream) + Send + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a backend");
    let port = listener.local_addr().expect("backend addr").port();
    listener.set_nonblocking(true).expect("nonblocking backend");
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("backend runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            while let Ok((stream, _)) = listener.accept().await {
                serve(stream);
            }
        });
    });
    port
}

/// Starts an HTTP/1.1 backend on `127.0.0.1:0` that answers `id` on `/`; returns its port.
pub fn http_backend(id: &str) -> u16 {
    let id: Arc<str> = id.into();
    spawn_backend(move |stream| {
        let id = id.clone();
        let service = hyper::service::service_fn(move |req| respond(id.clone(), req));
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            // A visitor that goes away mid-body ends the connection; nothing to report.
            let _ = conn.await;
        });
    })
}

/// Starts an h2c backend (prior-knowledge HTTP/2, no TLS) on `127.0.0.1:0` that answers
/// `h2c ID` to every request, so a visitor can tell it spoke HTTP/2 to the app; returns its port.
pub fn h2c_backend(id: &str) -> u16 {
    let answer = Bytes::from(format!("h2c {id}"));
    spawn_backend(move |stream| {
        let answer = answer.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let answer = answer.clone();
            async move {
                assert_eq!(req.version(), hyper::Version::HTTP_2);
                Ok::<_, Infallible>(Response::new(Full::new(answer)))
            }
        });
        let builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        tokio::spawn(async move {
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    })
}

/// An h2 connection to the gateway for `host` (TLS, ALPN `h2`, its driver spawned), once one
/// GET of `path` has been answered 200: the gateway's SETTINGS (extended CONNECT among them)
/// have arrived by then.
pub async fn h2_ready(
    ca_der: &Path,
    port: u16,
    host: &str,
    path: &str,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>> {
    let tls = tls_connect(ca_der, port, host, &[b"h2"]).await;
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let hello = Request::get(format!("https://{host}:{port}{path}"))
        .version(hyper::Version::HTTP_2)
        .body(http_body_util::Empty::new())
        .expect("a GET");
    let status = sender.send_request(hello).await.expect("GET over h2").status();
    assert_eq!(status, StatusCode::OK, "GET {path} over h2");
    sender
}

async fn respond(id: Arc<str>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let (route, arg) = path[1..].split_once('/').unwrap_or((&path[1..], ""));
    Ok(match route {
        "" | "id" => full(StatusCode::OK, id.to_string()),
        "headers" => {
            let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in req.headers() {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                map.entry(name.as_str().to_owned()).or_default().push(value);
            }
            full(StatusCode::OK, serde_json::to_vec(&map).expect("headers as JSON"))
        }
        "echo" => match req.into_body().collect().await {
            Ok(body) => full(StatusCode::OK, body.to_bytes()),
            Err(e) => full(StatusCode::BAD_REQUEST, e.to_string()),
        },
        "bytes" => {
            let len: u64 = arg.parse().unwrap_or(0);
            let frames = pattern_chunks(len).map(|c| Ok(Frame::data(Bytes::from_static(c))));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let mut resp = Response::new(BodyExt::boxed(body));
            let length = header::HeaderValue::from(len);
            resp.headers_mut().insert(header::CONTENT_LENGTH, length);
            resp
        }
        "upload" => upload(req.into_body()).await,
        "sleep" => {
            tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(0))).await;
            full(StatusCode::OK, "slept")
        }
        "ws" => websocket_echo(req),
        "page" => {
            let mut resp = full(StatusCode::OK, WEBSOCKET_PAGE);
            let html = header::HeaderValue::from_static("text/html; charset=utf-8");
            resp.headers_mut().insert(header::CONTENT_TYPE, html);
            resp
        }
        _ => full(StatusCode::NOT_FOUND, "no such route"),
    })
}

/// A page that opens a WebSocket to `/ws` on its own host, sends one message and shows the echo
/// (or the failure) in the page, for browsers.
const WEBSOCKET_PAGE: &str = r#"<!doctype html><html><head><meta charset="utf-8"><title>tunnel page</title></head>
<body><h1>served through the tunnel</h1><p id="ws">websocket: connecting</p><script>
const out = document.getElementById("ws");
// A request held for 2 s keeps headless Chromium's virtual time from running out before the
// echo, which comes back over real sockets.
fetch("/sleep/2000");
// A request held for 2 s keeps headless Chromium's virtual time from running out before the
// echo, which comes back over real sockets.
fetch("/sleep/2000");
const ws = new WebSocket("wss://" + location.host + "/ws");
ws.onopen = () => ws.send("ping from the browser");
ws.onmessage = (m) => { out.textContent = "websocket echo: " + m.data; ws.close(); };
ws.onerror = () => { out.textContent = "websocket: failed"; };
</script></body></html>"#;

/// Hashes a body as it streams in, never holding more than one frame.
async fn upload(mut body: Incoming) -> Response<Body> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return full(
                StatusCode::BAD_REQUEST,
                format!("the body broke after {len} bytes"),
            );
        };
        if let Some(data) = frame.data_ref() {
            ctx.update(data);
            len += data.len() as u64;
        }
    }
    let sha256 = data_encoding::HEXLOWER.encode(ctx.finish().as_ref());
    let json = serde_json::json!({ "len": len, "sha256": sha256 });
    full(StatusCode::OK, json.to_string())
}

/// Answers the WebSocket handshake and echoes every data message until the peer closes.
fn websocket_echo(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return full(StatusCode::BAD_REQUEST, "not a WebSocket handshake");
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
    let accept = header::HeaderValue::from_str(&accept).expect("accept key is a header value");
    headers.insert("sec-websocket-accept", accept);
    resp
}

/// `curl` as a visitor of one gateway: `--resolve` sends every host to 127.0.0.1, `--cacert`
/// trusts the test CA. Output files live in the test's temp dir.
pub struct Visitor {
    dir: PathBuf,
    port: u16,
    ca: PathBuf,
    /// The local address curl connects from (`--interface`), when not the default.
    source: Option<String>,
}

/// What one curl run saw.
pub struct Reply {
    pub status: u16,
    /// `1.1` or `2` (curl's `%{http_version}`).
    pub version: String,
    pub headers: String,
    pub body: Vec<u8>,
    pub stderr: String,
}

/// Shows at most the first 300 bytes of the body: bodies here reach megabytes.
impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = &self.body[..self.body.len().min(300)];
        let shown = match head.is_ascii() {
            true => String::from_utf8_lossy(head).into_owned(),
            false => "(binary)".to_owned(),
        };
        write!(
            f,
            "HTTP {} (version {:?}), {} body bytes {shown:?}\n{}curl stderr: {}",
            self.status,
            self.version,
            self.body.len(),
            self.headers,
            self.stderr
        )
    }
}

impl Reply {
    /// Panics unless the status is `status`, showing the reply.
    pub fn expect_status(&self, status: u16, what: &str) -> &Reply {
        assert_eq!(self.status, status, "{what}: {self:?}");
        self
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of response header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

impl Visitor {
    pub fn new(env: &TestEnv, gw: &Gateway) -> Visitor {
        Visitor::at(env, gw.port())
    }

    /// A visitor of whatever serves the gateway's TLS on 127.0.0.1:`port` (a load balancer).
    pub fn at(env: &TestEnv, port: u16) -> Visitor {
        Visitor {
            dir: env.path().to_owned(),
            port,
            ca: env.pki.ca.clone(),
            source: None,
        }
    }

    /// The same visitor connecting from `source` (any 127/8 address works on loopback), so the
    /// gateway behind a load balancer has a real client address to tell from the balancer's.
    pub fn with_source(mut self, source: &str) -> Visitor {
        self.source = Some(source.to_owned());
        self
    }

    /// The same visitor trusting `ca` instead of the test CA (a tunnel's own certificate).
    pub fn trusting(mut self, ca: &Path) -> Visitor {
        ca.clone_into(&mut self.ca);
        self
    }

    /// `https://HOST:PORT/PATH` on the gateway.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    /// A fresh path in the temp dir, for request or response bodies.
    pub fn file(&self, what: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{what}-{n}"))
    }

    /// `curl -sS --max-time SECS --resolve HOST:PORT:127.0.0.1 --cacert CA [--interface SOURCE]
    /// ARGS...`.
    pub fn curl(&self, host: &str, max_time: Duration, args: &[&str]) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", &max_time.as_secs().to_string()])
            .args(["--resolve", &format!("{host}:{}:127.0.0.1", self.port)])
            .arg("--cacert")
            .arg(&self.ca);
        if let Some(source) = &self.source {
            cmd.args(["--interface", source]);
        }
        cmd.args(args);
        cmd
    }

    /// Runs curl on `url` (which names `host`) with `args`, bounded by the setup deadline.
    pub fn fetch(&self, host: &str, url: &str, args: &[&str]) -> Reply {
        let (body, headers) = (self.file("body"), self.file("headers"));
        let mut cmd = self.curl(host, SETUP - Duration::from_secs(5), args);
        cmd.arg("-o").arg(&body).arg("-D").arg(&headers);
        cmd.args(["-w", "%{http_code} %{http_version}", url]);
        let out = run_bounded(&self.dir, "curl", cmd, SETUP);
        let (status, version) = out.stdout.split_once(' ').unwrap_or(("000", ""));
        let reply = Reply {
            status: status.parse().unwrap_or(0),
            version: version.to_owned(),
            headers: fs::read_to_string(&headers).unwrap_or_default(),
            body: fs::read(&body).unwrap_or_default(),
            stderr: out.stderr,
        };
        let _ = (fs::remove_file(body), fs::remove_file(headers));
        reply
    }

    /// GET `https://HOST:PORT/PATH` with extra curl `args`.
    pub fn get(&self, host: &str, path: &str, args: &[&str]) -> Reply {
        self.fetch(host, &self.url(host, path), args)
    }

    /// Streams `path` through `curl | sha256sum`, so the body is never stored; panics unless both
    /// exit 0 within `limit`. Returns curl's `STATUS SIZE` and the body's SHA-256.
    pub fn download_sha256(&self, host: &str, path: &str, limit: Duration) -> (String, String) {
        let write_out = "%{stderr}%{http_code} %{size_download}";
        let curl = self.curl(host, limit, &["-w", write_out, &self.url(host, path)]);
        let mut cmd = Command::new("bash");
        let pipeline = ["-o", "pipefail", "-c", "curl \"$@\" | sha256sum", "curl"];
        cmd.args(pipeline).args(curl.get_args());
        let mut proc = Proc::spawn(&self.dir, "download", cmd);
        let status = proc.wait_exit(limit + Duration::from_secs(10));
        let ok = status.is_some_and(|s| s.success());
        assert!(ok, "download of {path} failed\n{}", proc.describe());
        let hash = proc
            .stdout()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        (proc.stderr().trim().to_owned(), hash)
    }

    /// Streams `len` bytes of the pattern into `curl -T -` (a chunked PUT to `path`), written from
    /// a thread so nothing holds the whole body; panics unless curl exits 0 within `limit`.
    /// Returns the status and the response body.
    pub fn upload_pattern(&self, host: &str, path: &str, len: u64, limit: Duration) -> (u16, String) {
        let curl = self.curl(
            host,
            limit,
            &["-T", "-", "-w", "\n%{http_code}", &self.url(host, path)],
        );
        let mut proc = Proc::spawn(&self.dir, "upload", curl);
        let mut stdin = proc.take_stdin().expect("curl stdin");
        let writer = thread::spawn(move || pattern_chunks(len).try_for_each(|c| stdin.write_all(c)));
        let status = proc.wait_exit(limit + Duration::from_secs(10));
        let ok = status.is_some_and(|s| s.success());
        assert!(ok, "upload to {path} failed\n{}", proc.describe());
        writer
            .join()
            .expect("upload writer")
            .expect("write the upload into curl");
        let out = proc.stdout();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        (code.parse().unwrap_or(0), body.to_owned())
    }

    /// Starts curl in the background (e.g. a slow download), killed with its `Proc`.
    pub fn spawn(&self, host: &str, max_time: Duration, args: &[&str]) -> Proc {
        Proc::spawn(&self.dir, "curl-bg", self.curl(host, max_time, args))
    }
}

/// Resident set size of process `pid` in KiB (`VmRSS` in /proc), if it still runs.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's RSS every 100 ms on a thread until `peak()`.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, usize)>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let (mut peak, mut samples) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    (peak, samples) = (peak.max(kib), samples + 1);
                }
                thread::sleep(Duration::from_millis(100));
            }
            (peak, samples)
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling; returns the peak RSS in KiB and how many samples were taken.
    pub fn peak(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("rss sampler")
    }
}

/// A TLS connection to the gateway on 127.0.0.1:`port` for `host` (SNI), trusting only the test CA
/// (DER), offering `alpn`.
pub async fn tls_connect(ca_der: &Path, port: u16, host: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let config = super::pki::client_config(ca_der, alpn.iter().map(|p| p.to_vec()).collect());
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    let name = ServerName::try_from(host.to_owned()).expect("server name");
    let connector = tokio_rustls::TlsConnector::from(config);
    connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the gateway")
}

/// A small real auth service in the oauth2-proxy style: a visitor with the `sso=alice` cookie is
/// let in (200 with `X-Auth-Request-User`), anyone else is sent to the login page (302).
pub fn auth_service() -> u16 {
    use hyper::{Request, Response};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let h = req.headers();
                    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    // Like oauth2-proxy behind a trusted proxy: X-Real-IP in 10/8 skips the login.
                    let trusted_ip = get("x-real-ip").starts_with("10.");
                    let reply = if get("cookie").contains("sso=alice") || trusted_ip {
                        Response::builder()
                            .status(200)
                            .header("X-Auth-Request-User", "alice")
                            .body(http_body_util::Full::new(hyper::body::Bytes::new()))
                    } else {
                        let target = format!(
                            "https://sso.test/login?rd=https://{}{}",
                            get("x-forwarded-host"),
                            get("x-forwarded-uri")
                        );
                        Response::builder().status(302).header("Location", target).body(
                            http_body_util::Full::new(hyper::body::Bytes::from_static(b"to the login page")),
                        )
                    };
                    Ok::<_, std::convert::Infallible>(reply.unwrap())
                });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
    });
    port
}
