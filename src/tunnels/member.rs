//! One SSH connection's share in a tunnel: the forward it asked for, who it is, and its traffic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::names::KeyFingerprint;

/// A pool member's id, unique for the life of the process (the registry hands them out).
pub(crate) type MemberId = u64;

/// One SSH connection serving a tunnel.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) id: MemberId,
    /// The SSH connection's id, for logs and the admin API.
    pub(crate) conn: u64,
    /// The key the SSH connection authenticated with (its short id is `key.key_id()`).
    pub(crate) key: KeyFingerprint,
    pub(crate) name: String,
    /// The `tcpip-forward` address and port exactly as the client sent them: OpenSSH refuses a
    /// `forwarded-tcpip` channel that does not echo them.
    pub(crate) bind_address: String,
    pub(crate) bind_port: u32,
    pub(crate) client: SocketAddr,
    /// The AWS VPC endpoint the client came through, when an NLB said so (PROXY v2 TLV 0xEA).
    pub(crate) vpce: Option<String>,
    pub(crate) since: SystemTime,
    pub(crate) handle: russh::server::Handle,
    pub(crate) stats: Arc<MemberStats>,
}

/// Traffic through one pool member, for the admin API.
#[derive(Debug, Default)]
pub(crate) struct MemberStats {
    /// Bytes received from the tunnel client.
    pub(crate) bytes_in: AtomicU64,
    /// Bytes sent to the tunnel client.
    pub(crate) bytes_out: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) open_channels: AtomicUsize,
}

impl MemberStats {
    /// Takes a channel place under `limit` (`limits.channels_per_tunnel`), or `None` when full.
    pub(crate) fn try_open(self: &Arc<Self>, limit: usize) -> Option<ChannelSlot> {
        let before = self.open_channels.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            self.open_channels.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ChannelSlot(self.clone()))
    }
}

/// An open channel into a pool member; dropping it frees the place and keeps the stats reachable.
#[derive(Debug)]
pub(crate) struct ChannelSlot(Arc<MemberStats>);

impl ChannelSlot {
    pub(crate) fn stats(&self) -> &MemberStats {
        &self.0
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.open_channels.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn channel_places_are_bounded_and_freed_on_drop() {
        let stats = Arc::new(MemberStats::default());
        let a = stats.try_open(2).unwrap();
        let _b = stats.try_open(2).unwrap();
        assert!(stats.try_open(2).is_none(), "the third place is refused");
        drop(a);
        assert!(stats.try_open(2).is_some(), "a freed place can be taken again");
        assert_eq!(stats.open_channels.load(Ordering::Acquire), 1);
    }
}
