//! Channels into tunnels: the local registry as the [`Directory`] the HTTP proxy and `ssh -L`
//! use (it opens `forwarded-tcpip` channels to pool members, each charged to its visitor), and
//! the bridge that carries an `ssh -L` visitor's channel to one. Opens always run in spawned
//! tasks, never inside a russh handler callback (awaiting a channel open there deadlocks the
//! session).

use std::sync::Arc;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};

use super::pump::{channel_io, Ledger};
use crate::budget::Budget;
use crate::config::LiveLimits;
use crate::io::ClientKey;
use crate::tunnels::{
    first_member, ChannelSlot, Directory, Member, Opened, Opening, Reach, Refused, TunnelKey, Tunnels,
};

/// The tunnels of this gateway, reached over their SSH connections.
#[derive(Debug)]
pub(crate) struct LocalDirectory {
    tunnels: Arc<Tunnels>,
    limits: LiveLimits,
    /// The largest window one channel may grant (`ssh.channel_buffer`).
    buffer: usize,
    budget: Arc<Budget>,
}

impl LocalDirectory {
    pub(crate) fn new(tunnels: Arc<Tunnels>, limits: LiveLimits, buffer: usize, budget: Arc<Budget>) -> Self {
        Self {
            tunnels,
            limits,
            buffer,
            budget,
        }
    }

    /// A place among `m`'s channels and a lease of the budget for `visitor`, or why not (logged
    /// and counted).
    fn place(&self, m: &Member, visitor: ClientKey) -> Option<ChannelSlot> {
        let max_channels = self.limits.load().channels_per_tunnel;
        let placed = match self.budget.lease(visitor) {
            Some(lease) => m.stats.try_open(max_channels, lease),
            None => Err(Refused::Budget),
        };
        let refused = match placed {
            Ok(slot) => return Some(slot),
            Err(refused) => refused,
        };
        let (result, why) = match refused {
            Refused::Full => ("limit", "the member has limits.channels_per_tunnel channels open"),
            Refused::VisitorShare => ("visitor_share", "the visitor holds its share of them"),
            Refused::Budget => (
                "budget",
                "limits.tunnel_buffer_budget, or the visitor's share of it, is used",
            ),
        };
        crate::metrics::forwarded_channel(result);
        tracing::info!(conn = m.conn, %visitor, max_channels, why, "channel to a tunnel member refused");
        None
    }
}

impl Directory for LocalDirectory {
    fn members(&self, key: &TunnelKey) -> Vec<Reach> {
        self.tunnels.members(key).into_iter().map(Reach::Local).collect()
    }

    fn open<'a>(&'a self, m: &'a Reach, origin: (&'a str, u32), visitor: ClientKey) -> Opening<'a> {
        Box::pin(async move {
            // This directory knows only its own members.
            let m = m.local()?;
            let slot = self.place(m, visitor)?;
            let channel = open_forwarded(m, origin).await?;
            let slot = Arc::new(slot);
            let weak = Arc::downgrade(&slot);
            let io = channel_io(channel, m.handle.clone(), self.buffer, Ledger::Slot(slot));
            Some(Opened {
                stream: Box::new(io),
                slot: Some(weak),
            })
        })
    }
}

/// Opens a `forwarded-tcpip` channel to one pool member, echoing the address and port its client
/// asked for (OpenSSH refuses anything else).
async fn open_forwarded(m: &Member, (origin_addr, origin_port): (&str, u32)) -> Option<Channel<Msg>> {
    let opened = m
        .handle
        .channel_open_forwarded_tcpip(m.bind_address.clone(), m.bind_port, origin_addr, origin_port)
        .await;
    match opened {
        Ok(ch) => {
            crate::metrics::forwarded_channel("opened");
            Some(ch)
        }
        Err(e) => {
            crate::metrics::forwarded_channel("failed");
            tracing::info!(conn = m.conn, error = %e, "tunnel client refused a channel");
            None
        }
    }
}

/// Carries an `ssh -L` visitor's channel to the first pool member that accepts one, then copies
/// bytes both ways; both channels are charged to `client`, the visitor's address. Runs in its own
/// task (see the module doc).
pub(crate) async fn bridge(
    (directory, budget): (Arc<dyn Directory>, Arc<Budget>),
    members: Vec<Reach>,
    (visitor, visitor_session, client): (Channel<Msg>, russh::server::Handle, ClientKey),
    reply: ChannelOpenHandle,
    origin: (String, u32),
    (open_timeout, buffer): (Duration, usize),
) {
    let Some(lease) = budget.lease(client) else {
        tracing::info!(%client, "visitor's share of limits.tunnel_buffer_budget is used up, or the budget is");
        reply.reject(ChannelOpenFailure::ResourceShortage).await;
        return;
    };
    let origin = (origin.0.as_str(), origin.1);
    let opened = first_member(&members, open_timeout, |m| {
        let directory = directory.clone();
        async move { directory.open(&m, origin, client).await }
    })
    .await;
    let Some((Opened { stream, .. }, _member)) = opened else {
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let mut upstream = stream;
    reply.accept().await;
    let mut visitor = channel_io(visitor, visitor_session, buffer, Ledger::Lease(lease));
    if let Err(e) = tokio::io::copy_bidirectional(&mut visitor, &mut upstream).await {
        tracing::debug!(error = %e, "tunnel bridge ended");
    }
}
