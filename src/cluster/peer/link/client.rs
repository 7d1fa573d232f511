//! The dialing end of the peer link: opens a stream on the owner replica, or says why not.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::frame::{now_ms, read_frame, rustls_error, write_all, FrameError};
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

/// The dialing end: opens streams on other replicas for this one.
pub(crate) struct PeerClient {
    tls: TlsConnector,
    hmac: hmac::Key,
    rid: String,
    connect_timeout: Duration,
    open_timeout: Duration,
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
            tls: TlsConnector::from(tls.client_config()),
            hmac: codec::hmac_key(&secret.derive(Label::PeerHmac)),
            rid: tls.rid().to_owned(),
            connect_timeout,
            open_timeout,
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
        let opened = self.try_open(addr, rid, req).await;
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

    async fn try_open(&self, addr: SocketAddr, rid: &str, req: PeerRequest) -> Result<BoxStream, PeerError> {
        self.exchange(addr, rid, req).await.map(|(stream, _)| stream)
    }

    /// Connects, sends the signed header, and waits for the status: the stream and the reason
    /// after OK, else why not.
    async fn exchange(
        &self,
        addr: SocketAddr,
        rid: &str,
        req: PeerRequest,
    ) -> Result<(BoxStream, String), PeerError> {
        let name = tls::server_name(rid).ok_or(PeerError::Request(CodecError::Field("replica id")))?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| PeerError::Io(std::io::Error::other("no randomness")))?;
        let req = req
            .stamped(&self.rid, now_ms(), nonce)
            .map_err(PeerError::Request)?;
        let header = codec::encode_request(&req, &self.hmac);
        let connect = async {
            let tcp = TcpStream::connect(addr).await.map_err(PeerError::Connect)?;
            let _ = tcp.set_nodelay(true);
            self.tls.connect(name, tcp).await.map_err(PeerError::from_tls)
        };
        let mut tls = timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| PeerError::Timeout("connect"))??;
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
}
