//! Upstream connections: HTTP/1.1 over channels into a tunnel's pool members (opened through the
//! [`Directory`]), kept alive per member and reused once their previous response has been read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::tunnels::{first_member, Directory, Member, MemberId};

pub(crate) type Sender = SendRequest<Incoming>;

/// Idle keep-alive connections a member keeps; more are closed when released.
const MAX_IDLE_PER_MEMBER: usize = 16;

/// Kept-alive upstream connections by pool member. A member that leaves takes its entry with it
/// (pruned as other members come and go); after [`IdlePool::close`] nothing is kept, so the
/// channels they hold close and a draining tunnel client can leave.
#[derive(Default)]
pub(crate) struct IdlePool {
    members: Mutex<HashMap<MemberId, Idle>>,
    closed: AtomicBool,
}

/// One member's idle connections, with a weak handle that tells when the member has gone.
type Idle = (Weak<Member>, Vec<Sender>);

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdlePool")
    }
}

impl IdlePool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MemberId, Idle>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, member: MemberId) -> Option<Sender> {
        let mut members = self.lock();
        let (_, idle) = members.get_mut(&member)?;
        while let Some(s) = idle.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, member: &Arc<Member>, s: Sender) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut members = self.lock();
        if !members.contains_key(&member.id) {
            // A new entry: forget the members that have gone meanwhile (bounded by live members).
            members.retain(|_, (m, _)| m.strong_count() > 0);
        }
        let (_, idle) = members
            .entry(member.id)
            .or_insert_with(|| (Arc::downgrade(member), Vec::new()));
        if idle.len() < MAX_IDLE_PER_MEMBER {
            idle.push(s);
        }
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

/// A ready connection to the first member that can serve: a kept-alive one, or a new channel.
/// Members that refuse, or take longer than `open_timeout` to open a channel, are skipped;
/// nothing was sent to them.
pub(crate) async fn connect(
    (directory, pool): (&dyn Directory, &IdlePool),
    members: &[Arc<Member>],
    origin: SocketAddr,
    open_timeout: Duration,
    upgrade: bool,
) -> Result<(Sender, Arc<Member>), UpstreamError> {
    let ip = origin.ip().to_canonical().to_string();
    let origin = (ip.as_str(), u32::from(origin.port()));
    first_member(members, open_timeout, |m| async move {
        if !upgrade {
            if let Some(s) = pool.take(m.id) {
                return Some(s);
            }
        }
        open(directory, &m, origin, upgrade).await
    })
    .await
    .ok_or(UpstreamError::Unavailable)
}

async fn open(directory: &dyn Directory, m: &Member, origin: (&str, u32), upgrade: bool) -> Option<Sender> {
    let io = TokioIo::new(directory.open(m, origin).await?);
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
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
    Some(sender)
}

/// Returns a connection to its member's idle list once its response has been read in full.
/// Waiting happens in its own task, so a slow download never blocks another request.
pub(crate) fn release(pool: Arc<IdlePool>, member: Arc<Member>, mut sender: Sender) {
    tokio::spawn(async move {
        if sender.ready().await.is_ok() {
            pool.put(&member, sender);
        }
    });
}
