//! HTTP/2 to tunnels whose owner asked for it (`upstream=h2c`: gRPC and other h2-only servers):
//! prior-knowledge cleartext HTTP/2 over a `forwarded-tcpip` channel. One connection per pool
//! member carries the member's requests at once, up to [`MAX_STREAMS`]; a new channel is opened
//! only when every connection of the member is full.
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

use crate::tunnels::{first_member, Directory, MemberId, Opened, Reach, Visitor, WeakReach};

/// Streams one connection carries at once before another channel is opened: the number most
/// HTTP/2 servers advertise (and gRPC's documented recommendation).
pub(crate) const MAX_STREAMS: usize = 100;
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

struct Conn {
    sender: SendRequest<Incoming>,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// One stream's place on a member's connection, given back when dropped: keep it as long as the
/// response body.
pub(crate) struct Stream(Arc<Conn>);

impl Stream {
    pub(crate) fn sender(&self) -> SendRequest<Incoming> {
        self.0.sender.clone()
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

    /// A place on a live connection to `member` with room for one more stream.
    fn take(&self, member: MemberId) -> Option<Stream> {
        let members = self.lock();
        let (_, conns) = members.get(&member)?;
        conns.iter().find_map(|c| {
            let room = !c.sender.is_closed()
                && c.streams
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < MAX_STREAMS).then_some(n + 1)
                    })
                    .is_ok();
            room.then(|| Stream(c.clone()))
        })
    }

    fn add(&self, member: &Reach, conn: Arc<Conn>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut members = self.lock();
        let (_, conns) = members
            .entry(member.id())
            .or_insert_with(|| (member.downgrade(), Vec::new()));
        conns.push(conn);
    }

    /// Forgets the connections that closed, idle past [`IDLE_TIMEOUT`], or of members that have
    /// gone (their streams in flight keep them until they end). Returns how many stay.
    pub(crate) fn sweep(&self) -> usize {
        let mut members = self.lock();
        members.retain(|_, (reach, conns)| {
            if !reach.is_alive() {
                return false;
            }
            conns.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= IDLE_TIMEOUT;
                !c.sender.is_closed() && !idle
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

/// A stream on the first member that can take one: a place on a shared connection, or a new
/// channel charged to `visitor`. Members that refuse or do not open within `open_timeout` are
/// skipped; nothing was sent to them.
pub(crate) async fn connect(
    (directory, shared): (&dyn Directory, &Shared),
    members: &[Reach],
    visitor: Visitor<'_>,
    open_timeout: Duration,
) -> Option<(Stream, Reach)> {
    first_member(members, open_timeout, |m| async move {
        if let Some(stream) = shared.take(m.id()) {
            return Some(stream);
        }
        let Opened { stream, .. } = directory.open(&m, visitor).await?;
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
            .map_err(|e| tracing::info!(error = %e, "h2c handshake with the tunnel failed"))
            .ok()?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "h2c upstream connection ended");
            }
        });
        let conn = Arc::new(Conn {
            sender,
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        shared.add(&m, conn.clone());
        Some(Stream(conn))
    })
    .await
}
