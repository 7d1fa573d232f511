//! Channels into tunnels: the local registry as the [`Directory`] the HTTP proxy and `ssh -L`
//! use (it opens `forwarded-tcpip` channels to pool members), and the bridge that carries an
//! `ssh -L` visitor's channel to one. Opens always run in spawned tasks, never inside a russh
//! handler callback (awaiting a channel open there deadlocks the session).

use std::sync::Arc;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};

use super::pump::channel_io;
use crate::config::LiveLimits;
use crate::io::BoxStream;
use crate::tunnels::{first_member, Directory, Member, Opening, TunnelKey, Tunnels};

/// The tunnels of this gateway, reached over their SSH connections.
#[derive(Debug)]
pub(crate) struct LocalDirectory {
    tunnels: Arc<Tunnels>,
    limits: LiveLimits,
    /// Bytes one channel may hold for a reader that is not keeping up (`ssh.channel_buffer`).
    buffer: usize,
}

impl LocalDirectory {
    pub(crate) fn new(tunnels: Arc<Tunnels>, limits: LiveLimits, buffer: usize) -> Self {
        Self {
            tunnels,
            limits,
            buffer,
        }
    }
}

impl Directory for LocalDirectory {
    fn members(&self, key: &TunnelKey) -> Vec<Arc<Member>> {
        self.tunnels.members(key)
    }

    fn open<'a>(&'a self, m: &'a Member, origin: (&'a str, u32)) -> Opening<'a> {
        Box::pin(async move {
            let max_channels = self.limits.load_full().channels_per_tunnel;
            let channel = open_forwarded(m, origin, max_channels, self.buffer).await?;
            let io: BoxStream = Box::new(channel);
            Some(io)
        })
    }
}

/// Opens a `forwarded-tcpip` channel to one pool member, echoing the address and port its client
/// asked for (OpenSSH refuses anything else), within `limits.channels_per_tunnel`.
async fn open_forwarded(
    m: &Member,
    (origin_addr, origin_port): (&str, u32),
    max_channels: usize,
    buffer: usize,
) -> Option<super::pump::ChannelIo> {
    let Some(slot) = m.stats.try_open(max_channels) else {
        crate::metrics::forwarded_channel("limit");
        tracing::info!(
            conn = m.conn,
            max_channels,
            "tunnel member has limits.channels_per_tunnel channels open"
        );
        return None;
    };
    let opened = m
        .handle
        .channel_open_forwarded_tcpip(m.bind_address.clone(), m.bind_port, origin_addr, origin_port)
        .await;
    match opened {
        Ok(ch) => {
            crate::metrics::forwarded_channel("opened");
            Some(channel_io(ch, m.handle.clone(), buffer, Some(slot)))
        }
        Err(e) => {
            crate::metrics::forwarded_channel("failed");
            tracing::info!(conn = m.conn, error = %e, "tunnel client refused a channel");
            None
        }
    }
}

/// Carries an `ssh -L` visitor's channel to the first pool member that accepts one, then copies
/// bytes both ways. Runs in its own task (see the module doc).
pub(crate) async fn bridge(
    directory: Arc<dyn Directory>,
    members: Vec<Arc<Member>>,
    (visitor, visitor_session): (Channel<Msg>, russh::server::Handle),
    reply: ChannelOpenHandle,
    origin: (String, u32),
    (open_timeout, buffer): (std::time::Duration, usize),
) {
    let origin = (origin.0.as_str(), origin.1);
    let opened = first_member(&members, open_timeout, |m| {
        let directory = directory.clone();
        async move { directory.open(&m, origin).await }
    })
    .await;
    let Some((mut upstream, _member)) = opened else {
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    reply.accept().await;
    let mut visitor = channel_io(visitor, visitor_session, buffer, None);
    if let Err(e) = tokio::io::copy_bidirectional(&mut visitor, &mut upstream).await {
        tracing::debug!(error = %e, "tunnel bridge ended");
    }
}
