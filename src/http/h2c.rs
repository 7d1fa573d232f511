//! HTTP/2 to tunnels whose owner asked for it (`upstream=h2c`: gRPC and other h2-only servers):
//! prior-knowledge cleartext HTTP/2 over a `forwarded-tcpip` channel. One connection per pool
//! member carries the member's requests at once, up to [`MAX_STREAMS`]; a new channel is opened
//! only when every connection of the member is full, up to [`MAX_CONNS`].
//!
//! A channel is charged to the visitor whose request opened it, for as long as it lives (its
//! window grows with its readers, leased from that visitor's share of the budget), and the app
//! is told that visitor's address as the channel's originator; each request carries its own
//! visitor in the forwarding headers. One visitor holds at most half of a member's streams. Each stream
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

use crate::io::ClientKey;
use crate::tunnels::{first_member, Directory, MemberId, Opened, Reach, Visitor, WeakReach};

/// Streams one connection carries at once before another channel is opened: the number most
/// HTTP/2 servers advertise (and gRPC's documented recommendation).
pub(crate) const MAX_STREAMS: usize = 100;
/// Connections one member gets at most (so 800 requests at once); a request beyond goes to the
/// pool's next member, or is a 502.
const MAX_CONNS: usize = 8;
/// Streams one visitor may hold on one member at once: half of what the member's connections
/// carry, as for HTTP/1.1 channels, so one visitor cannot take them all.
const MAX_STREAMS_PER_VISITOR: usize = MAX_STREAMS * MAX_CONNS / 2;
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

/// One stream's place on a member's connection, and in its visitor's share, given back when
/// dropped: keep it as long as the response body.
pub(crate) struct Stream {
    conn: Arc<Conn>,
    visitor: ClientKey,
    visitors: Visitors,
}

impl Stream {
    /// The connection's sender; `None` before [`connect`] opened it.
    pub(crate) fn sender(&self) -> Option<SendRequest<Incoming>> {
        self.conn.sender.get().cloned()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Idle from now on, before the count says so (the sweep reads both).
        if self.conn.streams.load(Ordering::Acquire) == 1 {
            *self.conn.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
        let mut visitors = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = visitors.get_mut(&self.visitor) {
            *n -= 1;
            if *n == 0 {
                visitors.remove(&self.visitor);
            }
        }
    }
}

/// Streams in flight on one member, by visitor.
type Visitors = Arc<Mutex<HashMap<ClientKey, usize>>>;

/// One member's connections, its visitors' shares, and a weak handle that tells when the member
/// has gone.
struct Conns {
    member: WeakReach,
    live: Vec<Arc<Conn>>,
    visitors: Visitors,
}

/// Why a member took no more streams.
#[derive(Debug)]
enum Refused {
    /// [`MAX_CONNS`] connections, each carrying [`MAX_STREAMS`].
    Full,
    /// The visitor holds [`MAX_STREAMS_PER_VISITOR`] already.
    VisitorShare,
}

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

    /// A place for `visitor` on a connection to `member` with room for one more stream (one
    /// still opening counts), else on a new one while the member has fewer than [`MAX_CONNS`].
    fn take(&self, member: &Reach, visitor: ClientKey) -> Result<Stream, Refused> {
        let mut members = self.lock();
        let conns = members.entry(member.id()).or_insert_with(|| Conns {
            member: member.downgrade(),
            live: Vec::new(),
            visitors: Visitors::default(),
        });
        let mut visitors = conns.visitors.lock().unwrap_or_else(|p| p.into_inner());
        if visitors
            .get(&visitor)
            .is_some_and(|n| *n >= MAX_STREAMS_PER_VISITOR)
        {
            return Err(Refused::VisitorShare);
        }
        let room = conns.live.iter().find(|c| {
            !c.is_closed()
                && c.streams
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < MAX_STREAMS).then_some(n + 1)
                    })
                    .is_ok()
        });
        let conn = match room {
            Some(c) => c.clone(),
            None => {
                conns.live.retain(|c| !c.is_closed());
                if conns.live.len() >= MAX_CONNS || self.closed.load(Ordering::Acquire) {
                    return Err(Refused::Full);
                }
                let conn = Arc::new(Conn {
                    sender: OnceCell::new(),
                    streams: AtomicUsize::new(1),
                    idle_since: Mutex::new(Instant::now()),
                });
                conns.live.push(conn.clone());
                conn
            }
        };
        *visitors.entry(visitor).or_insert(0) += 1;
        drop(visitors);
        Ok(Stream {
            conn,
            visitor,
            visitors: conns.visitors.clone(),
        })
    }

    /// Forgets the connections that closed, idle past [`IDLE_TIMEOUT`] (or never opened), or of
    /// members that have gone (their streams in flight keep them until they end).
    pub(crate) fn sweep(&self) {
        let mut members = self.lock();
        members.retain(|_, conns| {
            if !conns.member.is_alive() {
                return false;
            }
            conns.live.retain(|c| {
                let unused = c.streams.load(Ordering::Acquire) == 0
                    && (c.sender.get().is_none()
                        || c.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= IDLE_TIMEOUT);
                !c.is_closed() && !unused
            });
            !conns.live.is_empty()
        });
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
        let stream = match shared.take(&m, visitor.client) {
            Ok(stream) => stream,
            Err(why) => {
                tracing::info!(member = %m, ?why, "tunnel member takes no more h2c streams");
                return None;
            }
        };
        let opened = stream
            .conn
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
