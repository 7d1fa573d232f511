//! The HTTP side: a hyper server (HTTP/1.1 and h2 by ALPN, with upgrades) that routes by Host into
//! the tunnels, speaks HTTP/1.1 upstream over `forwarded-tcpip` channels, redirects plain HTTP to
//! https and answers the apex host itself.
//!
//! h2 is served only to clients that ask for it with ALPN. Prior-knowledge h2 (h2c on the plain
//! port, or over TLS without ALPN) meets the HTTP/1.1 server, which refuses its preface (400, or
//! a close). The plain port only redirects to https and answers ACME HTTP-01 (which validators
//! ask over HTTP/1.1), no browser speaks h2c, and one h2 path is one set of limits to keep.

mod access;
mod forward;
mod forward_auth;
pub(crate) mod grpc;
mod guard;
mod h2c;
pub mod host;
mod pages;
mod proxy;
mod upstream;
mod watch;
mod websocket;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, HttpConfig, LiveLimits};
use crate::io::{lingering, BoxStream, ClientAddr};
use crate::route::Wire;
use crate::rules::token::LinkKey;
use crate::tls::challenge::Challenges;
use crate::tunnels::{Directory, Route, TunnelKey};
pub use proxy::bench_prepare;
use upstream::IdlePool;
use watch::{ResponseWatch, StreamExec, Watched};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// The path ACME HTTP-01 challenges are served under; never redirected.
const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";
/// h2 keep-alive pings: a peer that stops answering is gone within 40 s (with the timeout),
/// before `limits.write_idle_timeout`'s default.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// hyper's default.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// What hyper buffers per h2 stream beyond what the visitor's window takes: two frames (hyper's
/// default is 400 KiB). The rest waits in the channel's window, which the budget pays for.
const H2_SEND_BUFFER: usize = 2 * watch::FRAME;
/// Time an idle h2 connection gets to send its GOAWAY and close before it is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

pub(crate) struct HttpContext {
    domain: String,
    public_port: u16,
    limits: LiveLimits,
    /// Who may send forwarding headers of their own.
    settings: HttpConfig,
    /// Where tunnels are found and opened.
    directory: Arc<dyn Directory>,
    /// Kept-alive upstream connections, by pool member.
    idle: Arc<IdlePool>,
    /// Shared HTTP/2 connections to `upstream=h2c` members.
    h2c: Arc<h2c::Shared>,
    challenges: Arc<Challenges>,
    /// Checks the links of private tunnels (the gateway sets the one `ssh gw link` signs with).
    pub(crate) links: Arc<LinkKey>,
    /// The SSH host key's fingerprint, shown on the apex page for users to pin (set by the
    /// gateway).
    pub(crate) host_key_fingerprint: String,
}

impl std::fmt::Debug for HttpContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpContext")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl HttpContext {
    pub(crate) fn new(
        config: &Config,
        directory: Arc<dyn Directory>,
        challenges: Arc<Challenges>,
        limits: LiveLimits,
    ) -> Self {
        Self {
            domain: config.domain.clone(),
            public_port: config.public_port,
            limits,
            settings: config.http.clone(),
            directory,
            idle: Arc::default(),
            h2c: Arc::default(),
            challenges,
            links: Arc::new(LinkKey::new(&rand::random::<[u8; 32]>())),
            host_key_fingerprint: String::new(),
        }
    }

    /// Shutdown: kept-alive upstream connections would hold their channels (and so their
    /// tunnel clients) open until the drain deadline.
    /// Sweeps the kept-alive upstream connections every `upstream::SWEEP_EVERY` (see
    /// `IdlePool::sweep`), until the process ends.
    pub(crate) async fn sweep_idle(self: Arc<Self>) {
        let mut every = tokio::time::interval(upstream::SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.idle.sweep();
            self.h2c.sweep();
        }
    }

    pub(crate) fn close_idle(&self) {
        self.idle.close();
        self.h2c.close();
    }
}

/// Why a request was not proxied; [`ProxyError::status`] is the one place errors become statuses.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("bad Host header: {0}")]
    BadHost(#[from] host::HostError),
    /// The host's name (`myapp-abcd1234`), and the ssh command that would start it.
    #[error("no tunnel {0} is connected\nstart it with: {1}")]
    NoTunnel(String, String),
    #[error("{0}")]
    Unavailable(#[from] upstream::UpstreamError),
    #[error("the tunnel did not answer within {0:?}")]
    Timeout(Duration),
    /// A gRPC request's own deadline (`grpc-timeout`) passed first.
    #[error("the tunnel did not answer within the request's gRPC deadline, {0:?}")]
    Deadline(Duration),
    #[error("the tunnel's response failed: {0}")]
    Upstream(hyper::Error),
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadHost(_) => StatusCode::BAD_REQUEST,
            Self::NoTunnel(..) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) | Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::Timeout(_) | Self::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// How a connection's own timer ends it.
enum Stop {
    /// A response waited too long for its visitor: drop the connection.
    Cut,
    /// No stream for a while: say goodbye (h2 GOAWAY), briefly, then drop it.
    Idle,
}

/// Runs a hyper connection to its end; on shutdown, asks it to finish in-flight requests and
/// close (h2 GOAWAY, HTTP/1.1 `Connection: close`); when `stop` resolves, ends it as that says.
/// Errors are boxed: the connection kinds report different error types.
macro_rules! drive {
    ($conn:expr, $shutdown:expr, $stop:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let r = tokio::select! {
            r = conn.as_mut() => r,
            () = $shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            stop = $stop => match stop {
                Stop::Cut => Ok(()),
                Stop::Idle => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(GOAWAY_GRACE, conn).await.unwrap_or(Ok(()))
                }
            }
        };
        r.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
    }};
}

/// Serves HTTP on a routed stream until the client leaves or `shutdown` asks for a graceful end.
/// With the version known from ALPN, hyper does not wait for bytes to detect it: a client silent
/// after the handshake then meets `header_timeout` like any other slow client (on h2: no stream
/// for `header_timeout`). A response its visitor takes nothing of for `write_idle_timeout` is cut.
pub(crate) async fn serve(
    ctx: Arc<HttpContext>,
    stream: BoxStream,
    client: ClientAddr,
    (tls, wire): (bool, Wire),
    shutdown: CancellationToken,
) {
    let client = Arc::new(client);
    let limits = ctx.limits.load_full();
    let write_idle = limits.write_idle_timeout;
    // HTTP/1.1 has one response in flight at a time: one watch for the connection.
    let conn_watch = Arc::new(ResponseWatch::default());
    let fallback = conn_watch.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (ctx, fallback, client) = (ctx.clone(), fallback.clone(), client.clone());
        async move {
            let watch = ResponseWatch::current_or(&fallback);
            let response = handle(&ctx, req, &client, tls).await;
            Ok::<_, Infallible>(response.map(|body| Watched::new(body, watch)))
        }
    });
    // Closed with a linger once hyper is done with it (see `io::lingering`).
    let (stream, returned) = lingering(stream);
    let io = TokioIo::new(stream);
    let max_headers = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
    let result = match wire {
        Wire::Http1 | Wire::Detect => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes);
            let stalled = async {
                conn_watch.stalled(write_idle).await;
                watch::cut("http/1.1", write_idle);
                Stop::Cut
            };
            drive!(b.serve_connection(io, service).with_upgrades(), shutdown, stalled)
        }
        Wire::H2 => {
            let streams = StreamExec::new(write_idle);
            let mut b = hyper::server::conn::http2::Builder::new(streams.clone());
            b.timer(TokioTimer::new())
                .max_header_list_size(max_headers)
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .max_send_buf_size(H2_SEND_BUFFER)
                .enable_connect_protocol();
            let idle = async {
                streams.idle(limits.header_timeout).await;
                tracing::debug!("h2 connection without a stream for limits.header_timeout; closing");
                Stop::Idle
            };
            drive!(b.serve_connection(io, service), shutdown, idle)
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended");
    }
    returned.linger().await;
}

/// Whether a response came from a member here (`local`) or through another replica (`peer`),
/// for the request metrics.
#[derive(Debug, Clone, Copy)]
struct Hop(&'static str);

async fn handle(
    ctx: &HttpContext,
    req: Request<Incoming>,
    client: &ClientAddr,
    tls: bool,
) -> Response<access::Logged> {
    let started = std::time::Instant::now();
    let html = pages::wants_html(req.headers());
    let (method, version) = (req.method().clone(), req.version());
    let path = req.uri().path().chars().take(256).collect();
    let host = authority(&req)
        .map(|a| String::from_utf8_lossy(a).chars().take(256).collect())
        .unwrap_or_default();
    let response = match route(ctx, req, client, tls).await {
        Ok(r) => r,
        // Said as a gRPC server would, so the client sees DEADLINE_EXCEEDED.
        Err(ProxyError::Deadline(waited)) => grpc::deadline_exceeded(waited),
        Err(e) => {
            tracing::debug!(error = %e, "request not proxied");
            text(e.status(), format!("{e}\n"))
        }
    };
    let response = pages::negotiate(response, html);
    let status = response.status().as_u16();
    let protocol = if version == Version::HTTP_2 {
        "h2"
    } else {
        "http/1.1"
    };
    let hop = response.extensions().get::<Hop>().map_or("local", |h| h.0);
    crate::metrics::http_request(&method, status, protocol, hop, started.elapsed().as_secs_f64());
    let entry = access::Entry {
        client: client.client,
        host,
        method,
        path,
        version,
        status,
        started,
    };
    response.map(|body| access::Logged::new(body, entry))
}

async fn route(
    ctx: &HttpContext,
    req: Request<Incoming>,
    client: &ClientAddr,
    tls: bool,
) -> Result<Response<Body>, ProxyError> {
    let host = host::parse_host(authority(&req).unwrap_or_default())?;
    if !tls {
        return Ok(redirect(ctx, &req, &host).await);
    }
    if host == ctx.domain {
        return Ok(apex(ctx, req.uri().path(), pages::wants_html(req.headers())));
    }
    let key = TunnelKey {
        host: host.clone(),
        route: Route::Http,
    };
    let members = ctx.directory.find(&key).await;
    if members.is_empty() {
        return Err(no_tunnel(&host, &ctx.domain));
    }
    let mut req = req;
    if let Err(answer) = guard::check(ctx, &mut req, client.client.ip(), &host, &members).await {
        return Ok(answer);
    }
    proxy::proxy(ctx, req, client, &members, &host).await
}

/// `:authority` for h2 (and absolute-form HTTP/1.1), else the `Host` header.
pub(crate) fn authority(req: &Request<Incoming>) -> Option<&[u8]> {
    req.uri()
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| req.headers().get(header::HOST).map(HeaderValue::as_bytes))
}

/// Plain HTTP: everything moves to https, except ACME HTTP-01 challenges.
async fn redirect(ctx: &HttpContext, req: &Request<Incoming>, host: &str) -> Response<Body> {
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if let Some(token) = path.strip_prefix(ACME_CHALLENGE_PREFIX) {
        return match ctx.challenges.http01_or_fetch(token).await {
            Some(key_authorization) => {
                tracing::info!(token, "answered an ACME HTTP-01 validation");
                text(StatusCode::OK, key_authorization)
            }
            None => text(StatusCode::NOT_FOUND, "no such challenge\n".into()),
        };
    }
    let location = format!("{}{path}", crate::names::https_origin(host, ctx.public_port));
    let mut resp = text(StatusCode::PERMANENT_REDIRECT, format!("moved to {location}\n"));
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn apex(ctx: &HttpContext, path: &str, html: bool) -> Response<Body> {
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/" => pages::landing(&ctx.domain, ctx.public_port, &ctx.host_key_fingerprint, html),
        "/docs" => pages::docs(),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The 404 of a host no tunnel serves, with the command that would (the name is the host's
/// label without its key id; a vanity host is its own name).
fn no_tunnel(host: &str, domain: &str) -> ProxyError {
    let label = host
        .strip_suffix(domain)
        .and_then(|l| l.strip_suffix('.'))
        .unwrap_or(host);
    let name = match label.rsplit_once('-') {
        Some((name, keyid)) if crate::names::is_key_id(keyid) => name,
        _ => label,
    };
    ProxyError::NoTunnel(
        label.to_owned(),
        format!("ssh -R {name}:80:localhost:3000 {domain}"),
    )
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.clone()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.extensions_mut().insert(pages::Said(body));
    resp
}
