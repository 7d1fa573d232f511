//! Upstream connections: HTTP/1.1 over channels into a tunnel's pool members (opened through the
//! [`Directory`]), kept alive per member and reused once their previous response has been read.
//! A channel is charged to the visitor whose request it carries; kept alive between requests it
//! is charged to no one, and the next visitor takes it only within its own shares.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::io::ClientKey;
use crate::tunnels::{
    first_member, ChannelSlot, Directory, MemberId, Opened, Reach, Refused, Visitor, WeakReach,
};

pub(crate) type Sender = SendRequest<Incoming>;

/// A kept-alive connection unused this long is closed, and with it its channel on the tunnel
/// client (nginx's `keepalive_timeout` for upstreams is 60 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often idle connections are swept: those past [`IDLE_TIMEOUT`], closed, or to a member
/// that has gone (a tunnel client that left, a replica that drains).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The upstream read buffer, so also the largest body chunk read from a channel at once and the
/// largest response head a tunnel may send: twice nginx's `proxy_buffer_size`.
const UPSTREAM_READ_BUFFER: usize = 16 * 1024;

/// A connection to a pool member, and its channel's place (to charge it to each visitor).
pub(crate) struct Upstream {
    pub(crate) sender: Sender,
    /// `None`: a stream to another replica, charged there.
    slot: Option<Weak<ChannelSlot>>,
}

/// Kept-alive upstream connections by pool member. A member that leaves takes its entry with it
/// (pruned as other members come and go); after [`IdlePool::close`] nothing is kept, so the
/// channels they hold close and a draining tunnel client can leave.
#[derive(Default)]
pub(crate) struct IdlePool {
    members: Mutex<HashMap<MemberId, Idle>>,
    closed: AtomicBool,
}

/// One member's idle connections, each with the time it was released, and a weak handle that
/// tells when the member has gone.
type Idle = (WeakReach, Vec<(Instant, Upstream)>);

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdlePool")
    }
}

impl IdlePool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MemberId, Idle>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kept-alive connection to `member`, charged to `visitor` if its shares (of the member's
    /// `limit` channels, of the budget) allow. One whose window the visitor's budget share
    /// cannot cover is closed: a new channel starts smaller.
    fn take(&self, member: MemberId, visitor: ClientKey, limit: usize) -> Option<Upstream> {
        let mut members = self.lock();
        let (reach, idle) = members.get_mut(&member)?;
        if !reach.is_alive() {
            members.remove(&member);
            return None;
        }
        while let Some((_, u)) = idle.pop() {
            if !u.sender.is_ready() || u.sender.is_closed() {
                continue;
            }
            let Some(slot) = &u.slot else { return Some(u) };
            let Some(slot) = slot.upgrade() else { continue };
            match slot.hand_to(visitor, limit) {
                Ok(()) => return Some(u),
                Err(Refused::Budget) => {}
                Err(_) => {
                    idle.push((Instant::now(), u));
                    return None;
                }
            }
        }
        None
    }

    /// Keeps `u` for the next request to `member`, with at most `max_idle` others: as many as
    /// the member may have channels (`limits.channels_per_tunnel`), so reuse holds at any
    /// concurrency the member can serve; the sweep closes those idle too long.
    fn put(&self, member: &Reach, u: Upstream, max_idle: usize) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut members = self.lock();
        if !members.contains_key(&member.id()) {
            // A new entry: forget the members that have gone meanwhile (bounded by live members).
            members.retain(|_, (m, _)| m.is_alive());
        }
        let (_, idle) = members
            .entry(member.id())
            .or_insert_with(|| (member.downgrade(), Vec::new()));
        if idle.len() < max_idle {
            idle.push((Instant::now(), u));
        }
    }

    /// Closes the connections idle past [`IDLE_TIMEOUT`] or closed by the other end, and those
    /// of members that have gone. Returns how many stay.
    pub(crate) fn sweep(&self) -> usize {
        let mut members = self.lock();
        members.retain(|_, (reach, idle)| {
            if !reach.is_alive() {
                return false;
            }
            idle.retain(|(at, u)| at.elapsed() < IDLE_TIMEOUT && !u.sender.is_closed());
            !idle.is_empty()
        });
        members.values().map(|(_, idle)| idle.len()).sum()
    }

    /// Closes every kept-alive connection and keeps none from now on (shutdown: they would hold
    /// their channels open).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.lock().clear();
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("no tunnel client accepted a channel")]
    Unavailable,
}

/// A ready connection to the first member that can serve: a kept-alive one, or a new channel,
/// charged to the visitor at `origin` (who came through VPC endpoint `vpce`) within its shares of the member's `limit` channels and of
/// the budget. Members that refuse, or take longer than `open_timeout` to open a channel, are
/// skipped; nothing was sent to them.
pub(crate) async fn connect(
    (directory, pool): (&dyn Directory, &IdlePool),
    members: &[Reach],
    (origin, vpce): (SocketAddr, Option<&str>),
    (open_timeout, limit): (Duration, usize),
    upgrade: bool,
) -> Result<(Upstream, Reach), UpstreamError> {
    let ip = origin.ip().to_canonical().to_string();
    let visitor = Visitor {
        origin: (ip.as_str(), u32::from(origin.port())),
        client: ClientKey::of(origin.ip()),
        vpce,
        key: None,
    };
    first_member(members, open_timeout, |m| async move {
        if !upgrade {
            if let Some(u) = pool.take(m.id(), visitor.client, limit) {
                return Some(u);
            }
        }
        open(directory, &m, visitor, upgrade).await
    })
    .await
    .ok_or(UpstreamError::Unavailable)
}

async fn open(directory: &dyn Directory, m: &Reach, visitor: Visitor<'_>, upgrade: bool) -> Option<Upstream> {
    let Opened { stream, slot } = directory.open(m, visitor).await?;
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(UPSTREAM_READ_BUFFER)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| tracing::info!(error = %e, "upstream handshake failed"))
        .ok()?;
    tokio::spawn(async move {
        let res = if upgrade {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Some(Upstream { sender, slot })
}

/// Returns a connection to its member's idle list once its response has been read in full,
/// charged to no one. Waiting happens in its own task, so a slow download never blocks another
/// request.
pub(crate) fn release(pool: Arc<IdlePool>, member: Reach, mut u: Upstream, max_idle: usize) {
    tokio::spawn(async move {
        if u.sender.ready().await.is_ok() {
            match u.slot.as_ref().map(Weak::upgrade) {
                Some(Some(slot)) => slot.park(),
                Some(None) => return,
                None => {}
            }
            pool.put(&member, u, max_idle);
        }
    });
}
