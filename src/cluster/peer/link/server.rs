//! The owner's end of the peer link: authenticates each stream, then hands it to the handler.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::frame::{now_ms, read_frame, rustls_error, write_all, FrameError};
use crate::cluster::peer::codec::{self, CodecError, PeerRequest, MAX_PEER_HEADER};
use crate::cluster::peer::replay::{NonceCache, Stale};
use crate::cluster::peer::secret::{ClusterSecret, Label};
use crate::cluster::peer::status::{self, Status};
use crate::cluster::peer::tls::PeerTls;
use crate::io::BoxStream;

/// A TLS handshake on the peer listener finishes within this: peers share a private network.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The header arrives within this once TLS is up (SCALEOUT §4.2: "within 2 s").
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A refusal or the OK is written within this, or the connection is dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// A handler's answer in the making: the stream to splice, or the status (not OK) and a reason.
pub(crate) type Dialing<'a> = Pin<Box<dyn Future<Output = Result<BoxStream, (Status, String)>> + Send + 'a>>;

/// What the owner replica does with an authenticated dial: open a stream to the tunnel `req`
/// names (a `forwarded-tcpip` channel whose originator is `req.source()`).
///
/// **Hop limit 1.** A handler serves from the local registry only and never dials another
/// replica: a host it does not hold is `NO_ROUTE`. Then loops and amplification cannot happen,
/// and the dialer, which owns the retry, drops that route and tries the next member. The server
/// bounds the call by its open timeout (`OPEN_FAILED` past it).
pub(crate) trait PeerHandler: Send + Sync {
    fn dial<'a>(&'a self, req: &'a PeerRequest) -> Dialing<'a>;
}

/// The owner's end: authenticates every stream before a handler sees it.
pub(crate) struct PeerServer {
    tls: TlsAcceptor,
    hmac: hmac::Key,
    nonces: Mutex<NonceCache>,
    handler: Arc<dyn PeerHandler>,
    open_timeout: Duration,
}

impl PeerServer {
    /// `open_timeout` bounds the handler's dial: the channel open crosses the tunnel client's WAN
    /// (`limits.tunnel_open_timeout`).
    pub(crate) fn new(
        tls: &PeerTls,
        secret: &ClusterSecret,
        handler: Arc<dyn PeerHandler>,
        open_timeout: Duration,
    ) -> Self {
        Self {
            tls: TlsAcceptor::from(tls.server_config()),
            hmac: codec::hmac_key(&secret.derive(Label::PeerHmac)),
            nonces: Mutex::new(NonceCache::default()),
            handler,
            open_timeout,
        }
    }

    /// Serves the peer listener until `shutdown`, through the shared accept loop: one of `slots`
    /// per connection, streams followed by `tracker` so a drain waits for them.
    pub(crate) async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        slots: Arc<Semaphore>,
        tasks: (CancellationToken, TaskTracker),
    ) {
        let serve = move |tcp, peer| self.clone().serve(tcp, peer);
        crate::listener::run(listener, slots, tasks, serve).await;
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let span = tracing::debug_span!("peer_in", %peer, sender = tracing::field::Empty, host = tracing::field::Empty);
        async {
            let outcome = self.stream(tcp).await;
            crate::metrics::peer_stream("in", outcome);
            tracing::debug!(outcome, "peer stream ended");
        }
        .instrument(span)
        .await;
    }

    /// One stream, from handshake to splice; its outcome as a metric label.
    async fn stream(&self, tcp: TcpStream) -> &'static str {
        let started = Instant::now();
        let _ = tcp.set_nodelay(true);
        let mut tls = match timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) if rustls_error(&e).is_some() => {
                tracing::info!(error = %e, "peer refused in the TLS handshake");
                crate::metrics::peer_auth_failure("tls");
                return "auth";
            }
            Ok(Err(_)) => return "io",
            Err(_) => return "timeout",
        };
        let parse = |buf: &[u8]| codec::parse_request(buf, &self.hmac);
        let read = read_frame(&mut tls, MAX_PEER_HEADER, codec::request_wanted, parse);
        let req = match timeout(HEADER_TIMEOUT, read).await {
            Ok(Ok(req)) => req,
            Ok(Err(FrameError::Invalid(CodecError::Hmac))) => {
                crate::metrics::peer_auth_failure("hmac");
                return refuse(tls, Status::Auth, "header refused: hmac").await;
            }
            Ok(Err(FrameError::Invalid(e))) => {
                tracing::info!(reason = e.reason(), error = %e, "peer header refused");
                return refuse(tls, Status::BadRequest, &format!("header refused: {e}")).await;
            }
            Ok(Err(FrameError::Io(_))) => return "io",
            Err(_) => return "timeout",
        };
        let span = tracing::Span::current();
        span.record("sender", req.sender());
        span.record("host", req.host());
        let fresh = self.nonces.lock().unwrap_or_else(|p| p.into_inner()).check(
            req.timestamp_ms(),
            req.nonce(),
            now_ms(),
        );
        match fresh {
            Ok(()) => {}
            Err(Stale::Full) => return refuse(tls, Status::Busy, "too many recent streams").await,
            Err(stale) => {
                tracing::info!(reason = stale.reason(), "peer header refused");
                crate::metrics::peer_auth_failure(stale.reason());
                return refuse(tls, Status::Auth, &format!("header refused: {}", stale.reason())).await;
            }
        }
        if !req.op().is_dial() {
            let reason = format!("op {} is not served by this version", req.op().label());
            return refuse(tls, Status::BadRequest, &reason).await;
        }
        let mut upstream = match timeout(self.open_timeout, self.handler.dial(&req)).await {
            Ok(Ok(upstream)) => upstream,
            // A handler that refuses with OK means it failed to say why.
            Ok(Err((Status::Ok, reason))) | Ok(Err((Status::OpenFailed, reason))) => {
                return refuse(tls, Status::OpenFailed, &reason).await;
            }
            Ok(Err((status, reason))) => return refuse(tls, status, &reason).await,
            Err(_) => return refuse(tls, Status::OpenFailed, "the tunnel did not open in time").await,
        };
        let ok = status::encode_reply(Status::Ok, "");
        if timeout(REPLY_TIMEOUT, write_all(&mut tls, &ok))
            .await
            .map_or(true, |r| r.is_err())
        {
            return "io";
        }
        crate::metrics::peer_open("in", started.elapsed().as_secs_f64());
        match tokio::io::copy_bidirectional(&mut tls, &mut upstream).await {
            Ok((to_owner, to_dialer)) => tracing::debug!(to_owner, to_dialer, "peer stream spliced"),
            Err(e) => tracing::debug!(error = %e, "peer stream cut"),
        }
        "ok"
    }
}

/// Writes a refusal, closes the connection, and returns the status as the outcome.
async fn refuse<S: AsyncWrite + Unpin>(mut tls: S, status: Status, reason: &str) -> &'static str {
    let reply = status::encode_reply(status, reason);
    let _ = timeout(REPLY_TIMEOUT, async {
        write_all(&mut tls, &reply).await?;
        tls.shutdown().await
    })
    .await;
    status.label()
}
