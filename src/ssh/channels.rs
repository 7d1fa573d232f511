//! Channels into tunnels: opening `forwarded-tcpip` channels to pool members, and bridging an
//! `ssh -L` (direct-tcpip) visitor to one. Always run from spawned tasks, never inside a russh
//! handler callback (awaiting a channel open there deadlocks the session).

use std::sync::Arc;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};

use super::pump::channel_io;
use crate::tunnels::{ChannelSlot, Member};

/// The bounds a bridge works within (`ssh.channel_buffer`, `limits.channels_per_tunnel`,
/// `limits.tunnel_open_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct BridgeLimits {
    pub buffer: usize,
    pub max_channels: usize,
    pub open_timeout: std::time::Duration,
}

/// Opens a `forwarded-tcpip` channel to the first pool member that accepts, then copies bytes both
/// ways. Runs in its own task (see the module doc).
pub async fn bridge(
    members: Vec<Arc<Member>>,
    (visitor, visitor_session): (Channel<Msg>, russh::server::Handle),
    reply: ChannelOpenHandle,
    origin: (String, u32),
    limits: BridgeLimits,
) {
    let mut found = None;
    for m in &members {
        let open = open_channel(m, &origin.0, origin.1, limits.max_channels);
        // A tunnel client that never answers is skipped like one that refuses.
        if let Ok(Some((ch, slot))) = tokio::time::timeout(limits.open_timeout, open).await {
            found = Some((ch, slot, m.handle.clone()));
            break;
        }
    }
    let Some((upstream, slot, upstream_session)) = found else {
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    reply.accept().await;
    let mut a = channel_io(visitor, visitor_session, limits.buffer, None);
    let mut b = channel_io(upstream, upstream_session, limits.buffer, Some(slot));
    if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        tracing::debug!(error = %e, "tunnel bridge ended");
    }
}

/// Opens a `forwarded-tcpip` channel to one pool member, echoing the address and port its client
/// asked for (OpenSSH refuses anything else), within `limits.channels_per_tunnel`.
pub async fn open_channel(
    m: &Member,
    origin_addr: &str,
    origin_port: u32,
    max_channels: usize,
) -> Option<(Channel<Msg>, ChannelSlot)> {
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
            Some((ch, slot))
        }
        Err(e) => {
            crate::metrics::forwarded_channel("failed");
            tracing::info!(conn = m.conn, error = %e, "tunnel client refused a channel");
            None
        }
    }
}
