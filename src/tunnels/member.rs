//! One SSH connection's share in a tunnel: the forward it asked for, who it is, its traffic, and
//! its channels: how many are open, and which visitor each one is charged to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use crate::budget::{Lease, CHANNEL_FLOOR};
use crate::io::ClientKey;
use crate::names::KeyFingerprint;
use crate::rules::{Bucket, Gate};

/// One visitor may hold at most 1/this of a member's `limits.channels_per_tunnel` (and at least
/// one): a visitor that holds channels and reads nothing can never take them all.
const VISITOR_SHARE_DIVISOR: usize = 2;

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
    /// Who may visit: the access rules of the SSH connection, shared by its forwards.
    pub(crate) gate: Arc<Gate>,
    /// This tunnel's request budget, made on first use from the gate's `rate`.
    pub(crate) bucket: OnceLock<Option<Bucket>>,
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
    /// Channels in use, by the visitor they are charged to.
    visitors: Mutex<HashMap<ClientKey, usize>>,
}

/// Why a channel place was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The member has `limits.channels_per_tunnel` channels open.
    Full,
    /// The visitor holds its share of them.
    VisitorShare,
    /// The visitor's share of the buffer budget (or the budget) cannot cover the channel.
    Budget,
}

impl MemberStats {
    /// Takes a channel place under `limit` (`limits.channels_per_tunnel`) for the visitor `lease`
    /// is charged to, within that visitor's share of the places.
    pub(crate) fn try_open(self: &Arc<Self>, limit: usize, lease: Lease) -> Result<ChannelSlot, Refused> {
        let mut visitors = self.visitors();
        if self.open_channels.load(Ordering::Acquire) >= limit {
            return Err(Refused::Full);
        }
        if !take_place(&mut visitors, lease.client(), limit) {
            return Err(Refused::VisitorShare);
        }
        self.open_channels.fetch_add(1, Ordering::AcqRel);
        let holder = Holder {
            lease,
            need: CHANNEL_FLOOR,
            window: crate::budget::FLOOR_WINDOW,
            in_use: true,
        };
        Ok(ChannelSlot {
            stats: self.clone(),
            holder: Mutex::new(holder),
        })
    }

    fn visitors(&self) -> MutexGuard<'_, HashMap<ClientKey, usize>> {
        self.visitors.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts one more channel for `visitor`, unless it holds its share of `limit` already.
fn take_place(visitors: &mut HashMap<ClientKey, usize>, visitor: ClientKey, limit: usize) -> bool {
    let held = visitors.entry(visitor).or_insert(0);
    if *held >= (limit / VISITOR_SHARE_DIVISOR).max(1) {
        if *held == 0 {
            visitors.remove(&visitor);
        }
        return false;
    }
    *held += 1;
    true
}

fn free_place(visitors: &mut HashMap<ClientKey, usize>, visitor: ClientKey) {
    if let Some(held) = visitors.get_mut(&visitor) {
        *held -= 1;
        if *held == 0 {
            visitors.remove(&visitor);
        }
    }
}

/// An open channel into a pool member, charged to the visitor using it (its place among the
/// member's channels, and its lease of the buffer budget). Dropping it frees both and keeps the
/// stats reachable.
#[derive(Debug)]
pub(crate) struct ChannelSlot {
    stats: Arc<MemberStats>,
    holder: Mutex<Holder>,
}

#[derive(Debug)]
struct Holder {
    lease: Lease,
    /// What the channel needs covered: its window or the bytes its peer may still send, whichever
    /// is larger, plus its buffers.
    need: usize,
    /// The window last granted.
    window: usize,
    /// Charged to `lease.client()`; when not, the channel is kept alive between requests.
    in_use: bool,
}

impl ChannelSlot {
    pub(crate) fn stats(&self) -> &MemberStats {
        &self.stats
    }

    fn holder(&self) -> MutexGuard<'_, Holder> {
        self.holder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window the channel may grant (see [`Lease::fit`]). Between requests nothing grows:
    /// the channel keeps its window until a visitor takes it again.
    pub(crate) fn window(&self, want: usize, outstanding: usize) -> usize {
        let mut h = self.holder();
        if h.in_use {
            h.window = h.lease.fit(want, outstanding);
            h.need = h.lease.bytes();
        } else {
            h.need = h.window.max(outstanding) + crate::budget::PIPELINE;
        }
        h.window
    }

    /// Charges the channel to no one while it is kept alive between requests: an idle HTTP/1.1
    /// connection reads whatever its peer sends and closes, so it holds nothing for a reader.
    pub(crate) fn park(&self) {
        let mut h = self.holder();
        if h.in_use {
            h.in_use = false;
            free_place(&mut self.stats.visitors(), h.lease.client());
            h.lease.release();
        }
    }

    /// Charges a parked channel to `visitor`, if its share of the member's channels (under
    /// `limit`) and of the budget allow. A channel in use is never handed on (`Full`).
    pub(crate) fn hand_to(&self, visitor: ClientKey, limit: usize) -> Result<(), Refused> {
        let mut h = self.holder();
        if h.in_use {
            return Err(Refused::Full);
        }
        let mut visitors = self.stats.visitors();
        if !take_place(&mut visitors, visitor, limit) {
            return Err(Refused::VisitorShare);
        }
        let need = h.need;
        if !h.lease.claim(visitor, need) {
            free_place(&mut visitors, visitor);
            return Err(Refused::Budget);
        }
        h.in_use = true;
        Ok(())
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        let h = self.holder();
        if h.in_use {
            free_place(&mut self.stats.visitors(), h.lease.client());
        }
        drop(h);
        self.stats.open_channels.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::budget::Budget;

    fn budget() -> Arc<Budget> {
        let raw = "domain = \"gw.test\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n";
        let limits = crate::config::parse(raw).unwrap().limits;
        Budget::new(Arc::new(arc_swap::ArcSwap::from_pointee(limits)))
    }

    fn visitor(n: u8) -> ClientKey {
        ClientKey::of(std::net::IpAddr::from([192, 0, 2, n]))
    }

    #[test]
    fn channel_places_are_bounded_and_freed_on_drop() {
        let (stats, budget) = (Arc::new(MemberStats::default()), budget());
        let open = |v| stats.try_open(2, budget.lease(visitor(v)).unwrap());
        let a = open(1).unwrap();
        let _b = open(2).unwrap();
        assert_eq!(open(3).unwrap_err(), Refused::Full, "the third place is refused");
        drop(a);
        assert!(open(3).is_ok(), "a freed place can be taken again");
        assert_eq!(stats.open_channels.load(Ordering::Acquire), 1);
    }

    #[test]
    fn one_visitor_holds_at_most_half_the_places_and_parked_ones_change_hands() {
        let (stats, budget) = (Arc::new(MemberStats::default()), budget());
        let open = |v| stats.try_open(4, budget.lease(visitor(v)).unwrap());
        let a1 = open(1).unwrap();
        let _a2 = open(1).unwrap();
        assert_eq!(open(1).unwrap_err(), Refused::VisitorShare);
        let _b1 = open(2).unwrap();
        a1.park();
        assert_eq!(
            a1.hand_to(visitor(2), 4),
            Ok(()),
            "a parked channel changes hands"
        );
        assert_eq!(a1.hand_to(visitor(3), 4), Err(Refused::Full), "not while in use");
        assert_eq!(open(2).unwrap_err(), Refused::VisitorShare, "visitor 2 holds two");
        let _a3 = open(1).unwrap();
        assert_eq!(open(3).unwrap_err(), Refused::Full);
        drop(a1);
        assert!(
            open(2).is_ok(),
            "dropping the handed channel freed visitor 2's place"
        );
    }
}
