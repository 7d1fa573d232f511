//! The owner's end of the peer link: authenticates each stream, then hands it to the handler.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::client::WARM_IDLE;
use super::frame::{now_ms, read_frame, rustls_error, tune, write_all, FrameError};
use crate::cluster::peer::codec::{self, CodecError, Op, PeerRequest, MAX_PEER_HEADER};
use crate::cluster::peer::replay::{NonceCache, Stale};
use crate::cluster::peer::secret::{ClusterSecret, Label};
use crate::cluster::peer::status::{self, Status};
use crate::cluster::peer::tls::PeerTls;
use crate::io::BoxStream;

/// A TLS handshake on the peer listener finishes within this: peers share a private network.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Each direction of a spliced stream copies through a buffer this large: a TLS record's
/// payload, so a bulk transfer takes one read and one write per record (tokio's default is 8 KiB).
const SPLICE_BUFFER: usize = 16 * 1024;
/// A refusal or the OK is written within this, or the connection is dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// A handler's answer in the making: the stream to splice, or the status (not OK) and a reason.
pub(crate) type Dialing<'a> = Pin<Box<dyn Future<Output = Result<BoxStream, (Status, String)>> + Send + 'a>>;

/// A handler's answer to a kill: how many SSH connections it closed, or the status and a reason.
pub(crate) type Killing<'a> = Pin<Box<dyn Future<Output = Result<u32, (Status, String)>> + Send + 'a>>;
/// A handler's answer to a lookup: the route it holds for the host, as the directory's JSON.
pub(crate) type Looking<'a> = Pin<Box<dyn Future<Output = Result<String, (Status, String)>> + Send + 'a>>;

/// The longest `list` body an owner sends and a dialer reads: lines of about 200 bytes, so some
/// twenty thousand hosts on one replica.
pub(crate) const MAX_LIST: usize = 4 * 1024 * 1024;

/// What the owner replica does with an authenticated dial: open a stream to the tunnel `req`
/// names (a `forwarded-tcpip` channel whose originator is `req.source()`); and with a kill
/// (the admin API's `DELETE /tunnels/{host}` on another replica): close the connections serving
/// `req.host()` here.
///
/// **Hop limit 1.** A handler serves from the local registry only and never dials another
/// replica: a host it does not hold is `NO_ROUTE`. Then loops and amplification cannot happen,
/// and the dialer, which owns the retry, drops that route and tries the next member. The server
/// bounds the call by its open timeout (`OPEN_FAILED` past it).
pub(crate) trait PeerHandler: Send + Sync {
    fn dial<'a>(&'a self, req: &'a PeerRequest) -> Dialing<'a>;

    fn kill<'a>(&'a self, req: &'a PeerRequest) -> Killing<'a>;

    /// The route this replica holds for `req.host()` (its route kind and port), for a dialer
    /// whose store does not answer; `NO_ROUTE` when it holds none.
    fn lookup<'a>(&'a self, req: &'a PeerRequest) -> Looking<'a>;

    /// Whether the store serves this replica now: a ping's answer, `store=up` or `store=down`,
    /// which a replica cut from the store takes as evidence that the store itself is fine.
    fn store_up(&self) -> bool;

    /// Every route this replica holds, one `host SP route-JSON` line each, at most [`MAX_LIST`]
    /// bytes: for a dialer whose store does not answer, so its lists stay right. The server
    /// sends it after an OK that names this replica.
    fn list(&self) -> Vec<u8>;
}

/// The owner's end: authenticates every stream before a handler sees it.
pub(crate) struct PeerServer {
    tls: TlsAcceptor,
    hmac: hmac::Key,
    nonces: Mutex<NonceCache>,
    handler: Arc<dyn PeerHandler>,
    open_timeout: Duration,
    /// This replica's id, as its certificate names it.
    rid: String,
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
            rid: tls.rid().to_owned(),
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
        let shutdown = tasks.0.clone();
        let serve = move |tcp, peer| self.clone().serve(tcp, peer, shutdown.clone());
        crate::listener::run(listener, slots, tasks, serve).await;
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
        let span = tracing::debug_span!("peer_in", %peer, sender = tracing::field::Empty, host = tracing::field::Empty);
        async {
            let outcome = self.stream(tcp, &shutdown).await;
            crate::metrics::peer_stream("in", outcome);
            tracing::debug!(outcome, "peer stream ended");
        }
        .instrument(span)
        .await;
    }

    /// One stream, from handshake to splice; its outcome as a metric label.
    async fn stream(&self, tcp: TcpStream, shutdown: &CancellationToken) -> &'static str {
        let started = Instant::now();
        tune(&tcp);
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
        // A warm connection still waiting for its header is closed at shutdown: the drain must
        // not wait for it, and the dialer dials anew.
        let request = tokio::select! {
            r = self.request(&mut tls) => r,
            () = shutdown.cancelled() => return "shutdown",
        };
        let req = match request {
            Ok(req) => req,
            Err(Refused::Silently(outcome)) => return outcome,
            Err(Refused::Answer(status, reason)) => return refuse(tls, status, &reason).await,
        };
        if req.op() == Op::Kill {
            return match timeout(self.open_timeout, self.handler.kill(&req)).await {
                Ok(Ok(closed)) => answer(tls, Status::Ok, &closed.to_string()).await,
                Ok(Err((status, reason))) => refuse(tls, status, &reason).await,
                Err(_) => refuse(tls, Status::OpenFailed, "the kill did not finish in time").await,
            };
        }
        if req.op() == Op::Ping {
            let health = if self.handler.store_up() {
                "store=up"
            } else {
                "store=down"
            };
            return answer(tls, Status::Ok, health).await;
        }
        if req.op() == Op::List {
            let body = self.handler.list();
            // The dialer may have taken any replica at this address: the OK says which.
            let ok = status::encode_reply(Status::Ok, &self.rid);
            let sent = timeout(self.open_timeout, async {
                write_all(&mut tls, &ok).await?;
                write_all(&mut tls, &body).await?;
                tls.shutdown().await
            })
            .await;
            return if matches!(sent, Ok(Ok(()))) { "ok" } else { "io" };
        }
        if req.op() == Op::Lookup {
            return match self.handler.lookup(&req).await {
                Ok(route) => answer(tls, Status::Ok, &route).await,
                Err((status, reason)) => refuse(tls, status, &reason).await,
            };
        }
        let mut upstream = match self.dial(&req).await {
            Ok(upstream) => upstream,
            Err(Refused::Silently(outcome)) => return outcome,
            Err(Refused::Answer(status, reason)) => return refuse(tls, status, &reason).await,
        };
        let ok = status::encode_reply(Status::Ok, "");
        if !matches!(timeout(REPLY_TIMEOUT, write_all(&mut tls, &ok)).await, Ok(Ok(()))) {
            return "io";
        }
        crate::metrics::peer_open("in", started.elapsed().as_secs_f64());
        match tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut upstream, SPLICE_BUFFER, SPLICE_BUFFER)
            .await
        {
            Ok((to_owner, to_dialer)) => tracing::debug!(to_owner, to_dialer, "peer stream spliced"),
            Err(e) => tracing::debug!(error = %e, "peer stream cut"),
        }
        "ok"
    }

    /// Reads the header and checks it: the HMAC, then time and nonce, then the op.
    async fn request<S: AsyncRead + Unpin>(&self, tls: &mut S) -> Result<PeerRequest, Refused> {
        let parse = |buf: &[u8]| codec::parse_request(buf, &self.hmac);
        let read = read_frame(tls, MAX_PEER_HEADER, codec::request_wanted, parse);
        // The certificate was checked: this is a replica of the cluster, and the dialer's warm
        // connections wait here for their header.
        let req = match timeout(WARM_IDLE, read).await {
            Ok(Ok(req)) => req,
            Ok(Err(FrameError::Invalid(CodecError::Hmac))) => return Err(Refused::auth("hmac")),
            Ok(Err(FrameError::Invalid(e))) => {
                tracing::info!(reason = e.reason(), error = %e, "peer header refused");
                return Err(Refused::Answer(
                    Status::BadRequest,
                    format!("header refused: {e}"),
                ));
            }
            Ok(Err(FrameError::Io(_))) => return Err(Refused::Silently("io")),
            Err(_) => return Err(Refused::Silently("timeout")),
        };
        let span = tracing::Span::current();
        span.record("sender", req.sender());
        span.record("host", req.host());
        let mut nonces = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = nonces.check(req.timestamp_ms(), req.nonce(), now_ms());
        drop(nonces);
        match fresh {
            Ok(()) => {}
            Err(Stale::Full) => return Err(Refused::Answer(Status::Busy, "too many recent streams".into())),
            Err(stale) => return Err(Refused::auth(stale.reason())),
        }
        if !(req.op().is_dial() || matches!(req.op(), Op::Kill | Op::Lookup | Op::Ping | Op::List)) {
            let reason = format!("op {} is not served by this version", req.op().label());
            return Err(Refused::Answer(Status::BadRequest, reason));
        }
        Ok(req)
    }

    /// The handler's stream for `req`, within the open timeout.
    async fn dial(&self, req: &PeerRequest) -> Result<BoxStream, Refused> {
        match timeout(self.open_timeout, self.handler.dial(req)).await {
            Ok(Ok(upstream)) => Ok(upstream),
            // A handler that refuses with OK failed to say why.
            Ok(Err((Status::Ok, reason))) => Err(Refused::Answer(Status::OpenFailed, reason)),
            Ok(Err((status, reason))) => Err(Refused::Answer(status, reason)),
            Err(_) => Err(Refused::Answer(
                Status::OpenFailed,
                "the tunnel did not open in time".into(),
            )),
        }
    }
}

/// Why a stream goes no further: silently (the connection is gone or timed out; the outcome), or
/// with a status and a reason for the dialer.
enum Refused {
    Silently(&'static str),
    Answer(Status, String),
}

impl Refused {
    /// An authentication failure: counted by `reason` (hmac, clock, replay) and answered AUTH.
    fn auth(reason: &'static str) -> Self {
        tracing::info!(reason, "peer header refused");
        crate::metrics::peer_auth_failure(reason);
        Self::Answer(Status::Auth, format!("header refused: {reason}"))
    }
}

/// Writes a refusal, closes the connection, and returns the status as the outcome.
async fn refuse<S: AsyncWrite + Unpin>(tls: S, status: Status, reason: &str) -> &'static str {
    answer(tls, status, reason).await
}

/// Writes a final reply (no stream follows), closes the connection, and returns the status as
/// the outcome.
async fn answer<S: AsyncWrite + Unpin>(mut tls: S, status: Status, reason: &str) -> &'static str {
    let reply = status::encode_reply(status, reason);
    let _ = timeout(REPLY_TIMEOUT, async {
        write_all(&mut tls, &reply).await?;
        tls.shutdown().await
    })
    .await;
    status.label()
}
