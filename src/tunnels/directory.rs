//! The seam between the tunnel users (the HTTP proxy, `ssh -L`) and whatever knows where tunnels
//! are: find a host's members, open a channel to one. The local registry implements it today;
//! a cluster directory can be added beside it without touching the callers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{ChannelSlot, Member, MemberId, Route, TunnelKey};
use crate::io::{BoxStream, ClientKey};
use crate::names::KeyFingerprint;

/// Where members of a pool can be reached: an SSH connection of this gateway, or another replica
/// that holds members (only a cluster directory hands those out).
#[derive(Debug, Clone)]
pub(crate) enum Reach {
    Local(Arc<Member>),
    Remote(Arc<RemoteMembers>),
}

/// Members of a pool held by another replica, as the cluster directory knows them.
#[derive(Debug)]
pub(crate) struct RemoteMembers {
    /// Unique among all ids this process hands out, local members' included.
    pub(crate) id: MemberId,
    /// The replica that holds them (its id in the directory).
    pub(crate) replica: String,
    /// The key that owns the pool.
    pub(crate) key: KeyFingerprint,
    pub(crate) host: String,
    pub(crate) route: Route,
    /// How the owner's app is spoken to, as the owner's replica published it.
    pub(crate) upstream: crate::rules::Upstream,
    /// Set once the replica drains, leaves, or no longer serves the pool: streams kept alive to
    /// it are closed, so its channels close and a draining owner can let its clients go.
    pub(crate) retired: AtomicBool,
}

impl RemoteMembers {
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

/// A pool another replica serves, as the cluster directory knows it: for the cluster-wide
/// tunnel lists.
#[derive(Debug, Clone)]
pub(crate) struct RemoteTunnel {
    pub(crate) key: TunnelKey,
    pub(crate) owner: KeyFingerprint,
    /// The replica's name.
    pub(crate) replica: String,
    pub(crate) members: u32,
}

impl Reach {
    /// What kept-alive upstream connections are pooled by.
    pub(crate) fn id(&self) -> MemberId {
        match self {
            Self::Local(m) => m.id,
            Self::Remote(r) => r.id,
        }
    }

    /// The key that owns the pool.
    pub(crate) fn key(&self) -> KeyFingerprint {
        match self {
            Self::Local(m) => m.key,
            Self::Remote(r) => r.key,
        }
    }

    /// The SSH connection, when the member is here.
    pub(crate) fn local(&self) -> Option<&Arc<Member>> {
        match self {
            Self::Local(m) => Some(m),
            Self::Remote(_) => None,
        }
    }

    /// A handle that says whether the member is still there, without keeping it.
    pub(crate) fn downgrade(&self) -> WeakReach {
        match self {
            Self::Local(m) => WeakReach::Local(Arc::downgrade(m)),
            Self::Remote(r) => WeakReach::Remote(Arc::downgrade(r)),
        }
    }
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(m) => write!(f, "connection {}", m.conn),
            Self::Remote(r) => write!(f, "replica {}", r.replica),
        }
    }
}

/// [`Reach::downgrade`]: gone once the member has left (or the replica no longer holds members).
#[derive(Debug, Clone)]
pub(crate) enum WeakReach {
    Local(Weak<Member>),
    Remote(Weak<RemoteMembers>),
}

impl WeakReach {
    pub(crate) fn is_alive(&self) -> bool {
        match self {
            Self::Local(m) => m.strong_count() > 0,
            Self::Remote(r) => r.upgrade().is_some_and(|r| !r.retired.load(Ordering::Acquire)),
        }
    }
}

/// Who a channel is opened for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Visitor<'a> {
    /// The address and port the tunnel client is told the connection comes from.
    pub(crate) origin: (&'a str, u32),
    /// Who the channel is charged to (its address, or its IPv6 /64).
    pub(crate) client: ClientKey,
    /// The AWS VPC endpoint the visitor came through (from its PROXY header).
    pub(crate) vpce: Option<&'a str>,
    /// The key of an `ssh -L` visitor.
    pub(crate) key: Option<KeyFingerprint>,
}

/// A future that opens one channel, boxed so the trait can be used as `dyn Directory`.
pub(crate) type Opening<'a> = Pin<Box<dyn Future<Output = Option<Opened>> + Send + 'a>>;

/// An open channel: its stream, and its place among the member's channels, through which a
/// kept-alive connection is charged to each visitor that uses it (gone once the channel is).
/// `None`: a stream to another replica, whose channel is charged there.
pub(crate) struct Opened {
    pub(crate) stream: BoxStream,
    pub(crate) slot: Option<Weak<ChannelSlot>>,
}

/// A future that finds members, boxed so the trait can be used as `dyn Directory`.
pub(crate) type Finding<'a> = Pin<Box<dyn Future<Output = Vec<Reach>> + Send + 'a>>;

/// Where tunnels are, and how to reach them.
pub(crate) trait Directory: Send + Sync {
    /// Where the members serving `key` are, in the order to try them, from what this process
    /// knows now.
    fn members(&self, key: &TunnelKey) -> Vec<Reach>;

    /// [`Directory::members`], or when those are none and what this process knows may be behind
    /// (a cluster whose store does not answer), what asking around finds, bounded in time.
    fn find<'a>(&'a self, key: &'a TunnelKey) -> Finding<'a> {
        Box::pin(std::future::ready(self.members(key)))
    }

    /// Opens a channel to `member` for `visitor`, charged to it: within the member's channel
    /// limit, the visitor's share of it, and the visitor's share of the buffer budget. `None`:
    /// refused or full.
    fn open<'a>(&'a self, member: &'a Reach, visitor: Visitor<'a>) -> Opening<'a>;

    /// Pools other replicas serve (none without a cluster).
    /// Other replicas' members of `key`'s pool that pass TLS through, in the order to try;
    /// cheap when there are none (asked on every TLS handshake naming a tunnel host).
    fn passthrough_members(&self, _key: &TunnelKey) -> Vec<Reach> {
        Vec::new()
    }

    fn remote_tunnels(&self) -> Vec<RemoteTunnel> {
        Vec::new()
    }

    /// This replica's name in a cluster.
    fn replica_name(&self) -> Option<&str> {
        None
    }

    /// In a cluster, whether the copy of other replicas' tunnels is current (`ok`) or may be
    /// behind because the store does not answer (`stale`).
    fn freshness(&self) -> Option<&'static str> {
        None
    }
}

/// Tries `members` in order and returns the first success of `attempt` with its member. A member
/// whose attempt fails, or takes longer than `timeout` (a tunnel client that never answers), is
/// skipped; nothing was sent to it, so the next one may serve.
pub(crate) async fn first_member<T, F, Fut>(
    members: &[Reach],
    timeout: Duration,
    mut attempt: F,
) -> Option<(T, Reach)>
where
    F: FnMut(Reach) -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for m in members {
        match tokio::time::timeout(timeout, attempt(m.clone())).await {
            Ok(Some(found)) => return Some((found, m.clone())),
            Ok(None) => {}
            Err(_) => {
                tracing::info!(member = %m, "tunnel member did not open a channel in time; trying the next")
            }
        }
    }
    None
}
