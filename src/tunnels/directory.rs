//! The seam between the tunnel users (the HTTP proxy, `ssh -L`) and whatever knows where tunnels
//! are: find a host's members, open a channel to one. The local registry implements it today;
//! a cluster directory can be added beside it without touching the callers.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{ChannelSlot, Member, TunnelKey};
use crate::io::{BoxStream, ClientKey};

/// A future that opens one channel, boxed so the trait can be used as `dyn Directory`.
pub(crate) type Opening<'a> = Pin<Box<dyn Future<Output = Option<Opened>> + Send + 'a>>;

/// An open channel: its stream, and its place among the member's channels, through which a
/// kept-alive connection is charged to each visitor that uses it (gone once the channel is).
pub(crate) struct Opened {
    pub(crate) stream: BoxStream,
    pub(crate) slot: Weak<ChannelSlot>,
}

/// Where tunnels are, and how to reach them.
pub(crate) trait Directory: Send + Sync {
    /// The members serving `key`, in the order to try them (the pool's round robin).
    fn members(&self, key: &TunnelKey) -> Vec<Arc<Member>>;

    /// Opens a channel to `member` on behalf of `origin` (the address and port the tunnel client
    /// is told the connection comes from), charged to `visitor`: within the member's channel
    /// limit, the visitor's share of it, and the visitor's share of the buffer budget. `None`:
    /// refused or full.
    fn open<'a>(&'a self, member: &'a Member, origin: (&'a str, u32), visitor: ClientKey) -> Opening<'a>;
}

/// Tries `members` in order and returns the first success of `attempt` with its member. A member
/// whose attempt fails, or takes longer than `timeout` (a tunnel client that never answers), is
/// skipped; nothing was sent to it, so the next one may serve.
pub(crate) async fn first_member<T, F, Fut>(
    members: &[Arc<Member>],
    timeout: Duration,
    mut attempt: F,
) -> Option<(T, Arc<Member>)>
where
    F: FnMut(Arc<Member>) -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for m in members {
        match tokio::time::timeout(timeout, attempt(m.clone())).await {
            Ok(Some(found)) => return Some((found, m.clone())),
            Ok(None) => {}
            Err(_) => tracing::info!(
                conn = m.conn,
                "tunnel client did not open a channel in time; trying the next"
            ),
        }
    }
    None
}
