//! HTTP/2 to tunnels whose owner asked for it (`upstream=h2c`: gRPC and other h2-only servers):
//! prior-knowledge cleartext HTTP/2 over a `forwarded-tcpip` channel. One connection per pool
//! member carries the member's requests at once, up to [`MAX_STREAMS`]; a new channel is opened
//! only when every connection of the member is full, up to [`MAX_CONNS`].
//!
//! A channel is charged to the visitor whose request opened it, for as long as it lives (its
//! window grows with its readers, leased from that visitor's share of the budget). Each stream
//! may hold [`STREAM_WINDOW`] of response the visitor has not taken, so a slow visitor stalls
//! only its own stream; the connection stalls only when [`CONN_WINDOW`] is held by such
//! streams, which the write-idle cut (`http::watch`) ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::OnceCell;

use crate::tunnels::{first_member, Directory, MemberId, Opened, Reach, Visitor, WeakReach};

/// Streams one connection carries at once before another channel is opened: the number most
/// HTTP/2 servers advertise (and gRPC's documented recommendation).
pub(crate) const MAX_STREAMS: usize = 100;
/// Connections one member gets at most (so 800 requests at once); a request beyond goes to the
/// pool's next member, or is a 502.
const MAX_CONNS: usize = 8;
/// Response bytes one stream may hold that its visitor has not taken yet.
const STREAM_WINDOW: u32 = 256 * 1024;
/// Response bytes one connection may hold across its streams: 16 stalled streams' worth.
const CONN_WINDOW: u32 = 16 * STREAM_WINDOW;
/// Request bytes buffered per stream beyond what the app's window takes.
const SEND_BUFFER: usize = 64 * 1024;
/// A connection without a stream this long is closed, and with it its channel (as for HTTP/1.1).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pings find an app (or tunnel client) that stopped answering.
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Largest response head taken from the app (as for HTTP/1.1: twice nginx's proxy buffer).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A member's connection: its sender once the handshake is done (the first request on it opens
/// it, the others wait for that), and its streams in flight.
struct Conn {
    sender: OnceCell<SendRequest<Incoming>>,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.sender.get().is_some_and(SendRequest::is_closed)
    }
}

/// One stream's place on a member's connection, given back when dropped: keep it as long as the
/// response body.
pub(crate) struct Stream(Arc<Conn>);

impl Stream {
    /// The connection's sender; `None` before [`connect`] opened it.
    pub(crate) fn sender(&self) -> Option<SendRequest<Incoming>> {
        self.0.sender.get().cloned()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

/// One member's connections, and a weak handle that tells when the member has gone.
type Conns = (WeakReach, Vec<Arc<Conn>>);

/// The members' shared connections. After [`Shared::close`] nothing is kept.
#[derive(Default)]
pub(crate) struct Shared {
    members: Mutex<HashMap<MemberId, Conns>>,
    closed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MemberId, Conns>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place on a connection to `member` with room for one more stream (one still opening
    /// counts), else on a new one while the member has fewer than [`MAX_CONNS`]; `None` when
    /// all are full.
    fn take(&self, member: &Reach) -> Option<Stream> {
        let mut members = self.lock();
        let (_, conns) = members
            .entry(member.id())
            .or_insert_with(|| (member.downgrade(), Vec::new()));
        let room = conns.iter().find(|c| {
            !c.is_closed()
                && c.streams
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < MAX_STREAMS).then_some(n + 1)
                    })
                    .is_ok()
        });
        if let Some(c) = room {
            return Some(Stream(c.clone()));
        }
        conns.retain(|c| !c.is_closed());
        if conns.len() >= MAX_CONNS || self.closed.load(Ordering::Acquire) {
            return None;
        }
        let conn = Arc::new(Conn {
            sender: OnceCell::new(),
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        conns.push(conn.clone());
        Some(Stream(conn))
    }

    /// Forgets the connections that closed, idle past [`IDLE_TIMEOUT`] (or never opened), or of
    /// members that have gone (their streams in flight keep them until they end). Returns how
    /// many stay.
    pub(crate) fn sweep(&self) -> usize {
        let mut members = self.lock();
        members.retain(|_, (reach, conns)| {
            if !reach.is_alive() {
                return false;
            }
            conns.retain(|c| {
                let unused = c.streams.load(Ordering::Acquire) == 0
                    && (c.sender.get().is_none()
                        || c.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= IDLE_TIMEOUT);
                !c.is_closed() && !unused
            });
            !conns.is_empty()
        });
        members.values().map(|(_, c)| c.len()).sum()
    }

    /// Keeps nothing from now on (shutdown).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.lock().clear();
    }
}

/// A stream on the first member that can take one: a place on a shared connection, or on a new
/// channel charged to `visitor`. Members that refuse, are full, or do not open within
/// `open_timeout` are skipped; nothing was sent to them.
pub(crate) async fn connect(
    (directory, shared): (&dyn Directory, &Shared),
    members: &[Reach],
    visitor: Visitor<'_>,
    open_timeout: Duration,
) -> Option<(Stream, Reach)> {
    first_member(members, open_timeout, |m| async move {
        let Some(stream) = shared.take(&m) else {
            tracing::info!(member = %m, "tunnel member's h2c connections are all full");
            return None;
        };
        let opened = stream
            .0
            .sender
            .get_or_try_init(|| open(directory, &m, visitor))
            .await;
        opened.is_ok().then_some(stream)
    })
    .await
}

/// A new channel to `m` and the HTTP/2 handshake on it.
async fn open(
    directory: &dyn Directory,
    m: &Reach,
    visitor: Visitor<'_>,
) -> Result<SendRequest<Incoming>, ()> {
    let Opened { stream, .. } = directory.open(m, visitor).await.ok_or(())?;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_send_buf_size(SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_while_idle(true);
    let (sender, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| tracing::info!(error = %e, "h2c handshake with the tunnel failed"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "h2c upstream connection ended");
        }
    });
    Ok(sender)
}
