//! The dialing end of the peer link: opens a stream on the owner replica, or says why not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::frame::{now_ms, read_frame, rustls_error, tune, write_all, FrameError};
use crate::cluster::peer::codec::{self, CodecError, PeerRequest, NONCE_LEN};
use crate::cluster::peer::secret::{ClusterSecret, Label};
use crate::cluster::peer::status::{self, Status, MAX_REPLY};
use crate::cluster::peer::tls::{self, PeerTls};
use crate::io::BoxStream;

/// Why a stream could not be opened on a peer. Every variant means that nothing of the
/// visitor's was sent: the caller may try another member.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("the owner replica holds no such tunnel: {0}")]
    NoRoute(String),
    #[error("the tunnel client did not open a channel: {0}")]
    OpenFailed(String),
    #[error("the owner replica is busy: {0}")]
    Busy(String),
    #[error("the owner replica is draining: {0}")]
    Draining(String),
    #[error("the owner replica refused our header: {0}")]
    Auth(String),
    #[error("the owner replica refused our request: {0}")]
    BadRequest(String),
    #[error("not sent, the request is invalid: {0}")]
    Request(CodecError),
    #[error("cannot connect to the peer: {0}")]
    Connect(std::io::Error),
    #[error("TLS with the peer failed: {0}")]
    Tls(std::io::Error),
    /// The address answered with another replica's certificate (an address reused by another
    /// replica): for the caller, the same as [`PeerError::NoRoute`].
    #[error("the peer is not the replica dialed: {0}")]
    WrongPeer(std::io::Error),
    #[error("the peer did not answer in time ({0})")]
    Timeout(&'static str),
    #[error("the peer's answer is malformed: {0}")]
    Protocol(CodecError),
    #[error("i/o error with the peer: {0}")]
    Io(std::io::Error),
}

impl PeerError {
    /// A bounded metric label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::NoRoute(_) => "no_route",
            Self::OpenFailed(_) => "open_failed",
            Self::Busy(_) => "busy",
            Self::Draining(_) => "draining",
            Self::Auth(_) => "auth",
            Self::BadRequest(_) => "bad_request",
            Self::Request(_) => "request",
            Self::Connect(_) => "connect_error",
            Self::Tls(_) => "tls",
            Self::WrongPeer(_) => "wrong_peer",
            Self::Timeout(_) => "timeout",
            Self::Protocol(_) => "protocol",
            Self::Io(_) => "io",
        }
    }

    fn refused(status: Status, reason: String) -> Self {
        match status {
            Status::NoRoute => Self::NoRoute(reason),
            Status::Busy => Self::Busy(reason),
            Status::Draining => Self::Draining(reason),
            Status::Auth => Self::Auth(reason),
            Status::BadRequest => Self::BadRequest(reason),
            Status::OpenFailed | Status::Ok => Self::OpenFailed(reason),
        }
    }

    /// An I/O error on the TLS stream: a TLS refusal (ours or the peer's alert), or plain I/O.
    fn from_tls(e: std::io::Error) -> Self {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match rustls_error(&e) {
            Some(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Self::WrongPeer(e)
            }
            Some(_) => Self::Tls(e),
            None => Self::Io(e),
        }
    }
}

/// Connections kept ready (TCP and TLS done, no header sent) per peer, so a stream usually
/// skips the handshakes. Small: a warm connection costs the owner a socket and a task.
const WARM_PER_PEER: usize = 2;
/// A warm connection is used within this or closed; the owner waits [`WARM_IDLE`] for the
/// header of an authenticated connection, so it is still listening.
const WARM_MAX_AGE: Duration = Duration::from_secs(20);
/// How long the owner waits for the header once a peer's certificate has been checked.
pub(crate) const WARM_IDLE: Duration = Duration::from_secs(30);

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Ready connections by peer (address and replica id); bounded by [`WARM_PER_PEER`] each, made
/// and pending together, and pruned of stale ones on every take.
type WarmPool = Mutex<HashMap<(SocketAddr, String), Ready>>;

#[derive(Default)]
struct Ready {
    conns: Vec<(Instant, Tls)>,
    /// Dials under way to top the pool up.
    pending: usize,
}

/// TCP and TLS to one peer, shared by the dials and the warm-pool refills.
#[derive(Clone)]
struct Connector {
    tls: TlsConnector,
    /// For [`PeerClient::fetch_any`]: checks the chain, not the name.
    any: TlsConnector,
    connect_timeout: Duration,
}

impl Connector {
    /// To replica `rid` at `addr`, or (`None`) whichever replica of the cluster is there.
    async fn connect(&self, addr: SocketAddr, rid: Option<&str>) -> Result<Tls, PeerError> {
        let (tls, name) = match rid {
            Some(rid) => (&self.tls, tls::server_name(rid)),
            None => (&self.any, tls::any_replica_name()),
        };
        let name = name.ok_or(PeerError::Request(CodecError::Field("replica id")))?;
        let connect = async {
            let tcp = TcpStream::connect(addr).await.map_err(PeerError::Connect)?;
            tune(&tcp);
            tls.connect(name, tcp).await.map_err(PeerError::from_tls)
        };
        timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| PeerError::Timeout("connect"))?
    }
}

/// The dialing end: opens streams on other replicas for this one.
pub(crate) struct PeerClient {
    connector: Connector,
    hmac: hmac::Key,
    rid: String,
    open_timeout: Duration,
    warm: Arc<WarmPool>,
}

impl PeerClient {
    /// `connect_timeout` bounds TCP and TLS (`[cluster.peer] connect_timeout`), `open_timeout`
    /// the wait for the status, which includes the owner's channel open
    /// (`limits.tunnel_open_timeout`).
    pub(crate) fn new(
        tls: &PeerTls,
        secret: &ClusterSecret,
        connect_timeout: Duration,
        open_timeout: Duration,
    ) -> Self {
        Self {
            connector: Connector {
                tls: TlsConnector::from(tls.client_config()),
                any: TlsConnector::from(tls.any_replica_config()),
                connect_timeout,
            },
            hmac: codec::hmac_key(&secret.derive(Label::PeerHmac)),
            rid: tls.rid().to_owned(),
            open_timeout,
            warm: Arc::default(),
        }
    }

    /// Opens a stream on replica `rid` at `addr` for `req`, which this method stamps with this
    /// replica's id, the time and a fresh nonce. The stream is returned after the owner's OK.
    pub(crate) async fn open(
        &self,
        addr: SocketAddr,
        rid: &str,
        req: PeerRequest,
    ) -> Result<BoxStream, PeerError> {
        let started = Instant::now();
        let opened = self.exchange(addr, rid, req).await.map(|(stream, _)| stream);
        match &opened {
            Ok(_) => {
                crate::metrics::peer_stream("out", "ok");
                crate::metrics::peer_open("out", started.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::debug!(peer = rid, %addr, error = %e, "peer stream not opened");
                crate::metrics::peer_stream("out", e.reason());
            }
        }
        opened
    }

    /// Sends `req` (a kill) to replica `rid` at `addr` and returns the owner's OK reason (for a
    /// kill, how many connections it closed).
    pub(crate) async fn command(
        &self,
        addr: SocketAddr,
        rid: &str,
        req: PeerRequest,
    ) -> Result<String, PeerError> {
        let done = self.exchange(addr, rid, req).await.map(|(_, reason)| reason);
        let outcome = done.as_ref().map_or_else(PeerError::reason, |_| "ok");
        crate::metrics::peer_stream("out", outcome);
        done
    }

    /// Sends `req` (a list) to whichever replica of the cluster listens at `addr` (one
    /// restarted under a new id included) and reads the body after the OK to its end: at most
    /// `limit` bytes, within twice the open timeout. Returns the id the owner gave in its OK
    /// and the body. No warm connection is used or kept.
    pub(crate) async fn fetch_any(
        &self,
        addr: SocketAddr,
        req: PeerRequest,
        limit: usize,
    ) -> Result<(String, Vec<u8>), PeerError> {
        let read = async {
            let tls = self.connector.connect(addr, None).await?;
            let (stream, rid) = self.ask(tls, req).await?;
            let mut body = Vec::new();
            let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
            stream
                .take(cap)
                .read_to_end(&mut body)
                .await
                .map_err(PeerError::Io)?;
            if body.len() > limit {
                return Err(PeerError::Protocol(CodecError::TooLong));
            }
            Ok((rid, body))
        };
        let done = match timeout(self.open_timeout * 2, read).await {
            Ok(done) => done,
            Err(_) => Err(PeerError::Timeout("list")),
        };
        let outcome = done.as_ref().map_or_else(PeerError::reason, |_| "ok");
        crate::metrics::peer_stream("out", outcome);
        done
    }

    /// Warm connections ready for `rid` at `addr` now.
    #[cfg(test)]
    pub(crate) fn warm(&self, addr: SocketAddr, rid: &str) -> usize {
        let pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        pool.get(&(addr, rid.to_owned())).map_or(0, |r| r.conns.len())
    }

    /// Sends the signed header on a warm connection, or a new one, and waits for the status:
    /// the stream and the reason after OK, else why not. A warm connection that turns out dead
    /// (the owner restarted) is replaced by a new one once; the header is signed anew, so the
    /// owner never sees a nonce twice.
    async fn exchange(
        &self,
        addr: SocketAddr,
        rid: &str,
        req: PeerRequest,
    ) -> Result<(BoxStream, String), PeerError> {
        let asked = match self.take_warm(addr, rid) {
            Some(tls) => {
                // The replacement is dialed now, not after the answer: its handshake shows within
                // the connect timeout whether the peer can still be reached, where the warm
                // connection to a peer cut off (no RST, packets dropped) would wait the whole
                // open timeout for a status the owner cannot send.
                let mut reachable = self.dial_warm(addr, rid);
                let ask = self.ask(tls, req.clone());
                tokio::pin!(ask);
                let done = tokio::select! {
                    done = &mut ask => done,
                    Ok(Err(unreachable)) = &mut reachable => return Err(unreachable),
                };
                match done {
                    Err(e @ (PeerError::Io(_) | PeerError::Tls(_))) => {
                        tracing::debug!(peer = rid, error = %e, "a warm peer connection was dead; dialing anew");
                        None
                    }
                    done => Some(done),
                }
            }
            None => None,
        };
        let done = match asked {
            Some(done) => done,
            None => {
                let tls = self.connector.connect(addr, Some(rid)).await?;
                self.ask(tls, req).await
            }
        };
        // Only a peer that answered gets connections kept ready: a dead or foreign one is not
        // dialed again in the background.
        if done.is_ok() {
            self.refill(addr, rid);
        }
        done
    }

    /// Stamps and signs `req`, sends it on `tls`, and reads the owner's status.
    async fn ask(&self, mut tls: Tls, req: PeerRequest) -> Result<(BoxStream, String), PeerError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| PeerError::Io(std::io::Error::other("no randomness")))?;
        let req = req
            .stamped(&self.rid, now_ms(), nonce)
            .map_err(PeerError::Request)?;
        let header = codec::encode_request(&req, &self.hmac);
        let answer = async {
            write_all(&mut tls, &header).await.map_err(PeerError::from_tls)?;
            match read_frame(&mut tls, MAX_REPLY, status::reply_wanted, status::parse_reply).await {
                Ok(reply) => Ok(reply),
                Err(FrameError::Invalid(e)) => Err(PeerError::Protocol(e)),
                Err(FrameError::Io(e)) => Err(PeerError::from_tls(e)),
            }
        };
        let reply = timeout(self.open_timeout, answer)
            .await
            .map_err(|_| PeerError::Timeout("open"))??;
        match reply.status {
            Status::Ok => Ok((Box::new(tls), reply.reason)),
            status => Err(PeerError::refused(status, reply.reason)),
        }
    }

    /// A warm connection to `rid` at `addr` young enough that the owner still waits on it.
    fn take_warm(&self, addr: SocketAddr, rid: &str) -> Option<Tls> {
        let mut pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|_, ready| {
            ready.conns.retain(|(at, _)| at.elapsed() < WARM_MAX_AGE);
            !ready.conns.is_empty() || ready.pending > 0
        });
        let ready = pool.get_mut(&(addr, rid.to_owned()))?;
        ready.conns.pop().map(|(_, tls)| tls)
    }

    /// Tops up `rid`'s warm connections in the background.
    fn refill(&self, addr: SocketAddr, rid: &str) {
        let missing = {
            let mut pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
            let ready = pool.entry((addr, rid.to_owned())).or_default();
            let missing = WARM_PER_PEER.saturating_sub(ready.conns.len() + ready.pending);
            ready.pending += missing;
            missing
        };
        for _ in 0..missing {
            drop(self.spawn_dial(addr, rid));
        }
    }

    /// Dials one warm connection to `rid` at `addr` in the background; the receiver learns
    /// whether TCP and TLS got through (the connection itself goes to the pool).
    fn dial_warm(&self, addr: SocketAddr, rid: &str) -> oneshot::Receiver<Result<(), PeerError>> {
        {
            let mut pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
            pool.entry((addr, rid.to_owned())).or_default().pending += 1;
        }
        self.spawn_dial(addr, rid)
    }

    /// The dial of [`PeerClient::dial_warm`], counted as pending by the caller.
    fn spawn_dial(&self, addr: SocketAddr, rid: &str) -> oneshot::Receiver<Result<(), PeerError>> {
        let key = (addr, rid.to_owned());
        let (tell, told) = oneshot::channel();
        let (connector, warm) = (self.connector.clone(), Arc::downgrade(&self.warm));
        tokio::spawn(async move {
            let dialed = connector.connect(key.0, Some(&key.1)).await;
            let Some(warm) = warm.upgrade() else { return };
            let mut pool = warm.lock().unwrap_or_else(|p| p.into_inner());
            let ready = pool.entry(key).or_default();
            ready.pending = ready.pending.saturating_sub(1);
            let _ = tell.send(dialed.map(|tls| ready.conns.push((Instant::now(), tls))));
        });
        told
    }
}
