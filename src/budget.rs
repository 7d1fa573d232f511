//! The tunnel buffer budget: the bytes of tunnel data the gateway may hold for readers that have
//! not taken them yet, in all (`limits.tunnel_buffer_budget`) and per client
//! (`limits.client_buffer_share`, a client being a [`ClientKey`]).
//!
//! Every open channel holds a [`Lease`]: the flow window it lets its peer fill (the most the
//! tunnel client may still send, or has sent and nobody has read), plus [`PIPELINE`] for the HTTP
//! and TLS buffers between the channel and the visitor. A lease starts at [`CHANNEL_FLOOR`]; a
//! channel that cannot get that much is not opened. Windows grow only while the budget and the
//! client's share are less than [`GROWTH_MARK`] used, so the rest is kept for new channels'
//! floors; above the mark they shrink as their readers consume. Nothing granted to a peer is ever
//! taken back: a lease shrinks only as far as the bytes still in flight allow.
//!
//! So `n` clients can make the gateway hold at most `min(budget, n × share)` of tunnel data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::LiveLimits;
use crate::io::ClientKey;

/// The smallest window a channel grants, and the one it starts with: two of OpenSSH's 32 KiB
/// packets. A reader at any pace gets its bytes through it, a reader that reads nothing pins no
/// more than this.
pub(crate) const FLOOR_WINDOW: usize = 64 * 1024;
/// What one channel's response may hold between the channel and the visitor's connection (all
/// bounded in `http`): the upstream read buffer (16 KiB), the frame handed downstream (16 KiB),
/// and hyper's h2 send buffer (32 KiB) or HTTP/1.1 write queue (`limits.max_header_bytes`,
/// 64 KiB by default). The connection's own TLS buffers are its fixed cost, outside the budget.
pub(crate) const PIPELINE: usize = 128 * 1024;
/// What every open channel holds at least.
pub(crate) const CHANNEL_FLOOR: usize = FLOOR_WINDOW + PIPELINE;
/// Windows grow only while the budget and the client's share are used less than this (in
/// quarters): the last quarter is kept for the floors of new channels.
const GROWTH_MARK: usize = 3;

/// The shared ledger of leases; one per gateway, handed down by `gateway`.
pub(crate) struct Budget {
    limits: LiveLimits,
    ledger: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    used: usize,
    clients: HashMap<ClientKey, usize>,
}

impl Ledger {
    fn client(&self, client: ClientKey) -> usize {
        self.clients.get(&client).copied().unwrap_or(0)
    }

    fn charge(&mut self, client: ClientKey, from: usize, to: usize) {
        self.used = self.used - from + to;
        let held = self.clients.entry(client).or_insert(0);
        *held = *held - from + to;
        if *held == 0 {
            self.clients.remove(&client);
        }
        crate::metrics::tunnel_buffer_reserved(self.used);
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("reserved", &self.reserved())
            .finish_non_exhaustive()
    }
}

/// `x` × GROWTH_MARK / 4.
fn mark(x: usize) -> usize {
    x / 4 * GROWTH_MARK
}

impl Budget {
    pub(crate) fn new(limits: LiveLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            ledger: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A channel's floor for `client`, or `None` when the budget or the client's share cannot
    /// cover one more channel.
    pub(crate) fn lease(self: &Arc<Self>, client: ClientKey) -> Option<Lease> {
        let mut lease = Lease {
            budget: self.clone(),
            client,
            bytes: 0,
        };
        lease.claim(client, CHANNEL_FLOOR).then_some(lease)
    }

    /// Bytes all leases hold.
    pub(crate) fn reserved(&self) -> usize {
        self.lock().used
    }
}

/// The bytes one channel holds, charged to one client; returned when dropped.
pub(crate) struct Lease {
    budget: Arc<Budget>,
    client: ClientKey,
    bytes: usize,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("client", &self.client)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Lease {
    pub(crate) fn client(&self) -> ClientKey {
        self.client
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Charges `bytes` to `client` instead of what the lease holds now, when that grows nothing
    /// or the budget and the client's share can take it; all or nothing.
    pub(crate) fn claim(&mut self, client: ClientKey, bytes: usize) -> bool {
        let limits = self.budget.limits.load();
        let mut ledger = self.budget.lock();
        let same = client == self.client;
        if !same || bytes > self.bytes {
            let mine = if same { self.bytes } else { 0 };
            let used = ledger.used - self.bytes + bytes;
            let held = ledger.client(client) - mine + bytes;
            if used > limits.tunnel_buffer_budget || held > limits.client_buffer_share {
                return false;
            }
        }
        ledger.charge(self.client, self.bytes, 0);
        ledger.charge(client, 0, bytes);
        (self.client, self.bytes) = (client, bytes);
        true
    }

    /// Gives everything back, keeping the lease (a channel kept alive between requests).
    pub(crate) fn release(&mut self) {
        self.claim(self.client, 0);
    }

    /// The window a channel may grant when its reader's pace asks for `want` and the peer may
    /// still send `outstanding` bytes (never more than the window the lease covers now): grown
    /// toward `want` only below the growth mark, halved above it, never below [`FLOOR_WINDOW`].
    /// The lease then covers the larger of the window and `outstanding`, plus [`PIPELINE`].
    pub(crate) fn fit(&mut self, want: usize, outstanding: usize) -> usize {
        let limits = self.budget.limits.load();
        let (total, share) = (limits.tunnel_buffer_budget, limits.client_buffer_share);
        let mut ledger = self.budget.lock();
        let current = self.bytes.saturating_sub(PIPELINE);
        let held = ledger.client(self.client);
        let mut window = want.max(FLOOR_WINDOW);
        if window > current {
            let room = mark(total)
                .saturating_sub(ledger.used)
                .min(mark(share).saturating_sub(held));
            window = window.min(current + room);
        }
        if ledger.used > mark(total) || held > mark(share) {
            window = window.min(current / 2);
        }
        let window = window.max(FLOOR_WINDOW);
        let bytes = window.max(outstanding) + PIPELINE;
        ledger.charge(self.client, self.bytes, bytes);
        self.bytes = bytes;
        window
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Limits;

    const MIB: usize = 1024 * 1024;

    fn budget(total: usize, share: usize) -> Arc<Budget> {
        let raw = "domain = \"gw.test\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n";
        let mut limits: Limits = crate::config::parse(raw).unwrap().limits;
        limits.tunnel_buffer_budget = total;
        limits.client_buffer_share = share;
        Budget::new(Arc::new(arc_swap::ArcSwap::from_pointee(limits)))
    }

    fn client(n: u8) -> ClientKey {
        ClientKey::of(std::net::IpAddr::from([192, 0, 2, n]))
    }

    #[test]
    fn floors_stop_at_the_share_and_at_the_budget() {
        let b = budget(4 * CHANNEL_FLOOR, 2 * CHANNEL_FLOOR);
        let a1 = b.lease(client(1)).unwrap();
        let _a2 = b.lease(client(1)).unwrap();
        assert!(b.lease(client(1)).is_none(), "client 1 is at its share");
        let _b1 = b.lease(client(2)).unwrap();
        let _b2 = b.lease(client(2)).unwrap();
        assert!(b.lease(client(3)).is_none(), "the budget is used up");
        drop(a1);
        let c1 = b.lease(client(3));
        assert!(c1.is_some(), "a dropped lease is given back");
        assert_eq!(b.reserved(), 4 * CHANNEL_FLOOR);
    }

    #[test]
    fn windows_grow_below_the_mark_and_shrink_above_it() {
        let b = budget(64 * MIB, 16 * MIB);
        let mut fast = b.lease(client(1)).unwrap();
        let mut window = FLOOR_WINDOW;
        for _ in 0..20 {
            window = fast.fit(window * 2, window);
        }
        // The client's mark (12 MiB) stops the growth, the lease never passes it.
        assert!(window <= 12 * MIB && window > 8 * MIB, "{window}");
        assert!(fast.bytes() <= 12 * MIB, "{}", fast.bytes());
        // A second channel of the same client still gets its floor, but does not grow.
        let mut second = b.lease(client(1)).unwrap();
        assert_eq!(second.fit(MIB, FLOOR_WINDOW), FLOOR_WINDOW);
        // Above the mark the big window halves, yet still covers what the peer may send.
        let _third = b.lease(client(1)).unwrap();
        let outstanding = window;
        let halved = fast.fit(window * 2, outstanding);
        assert!(halved <= window / 2, "{halved}");
        assert_eq!(fast.bytes(), outstanding + PIPELINE);
        // Once consumed, the lease follows the window down.
        fast.fit(FLOOR_WINDOW, 0);
        assert_eq!(fast.bytes(), CHANNEL_FLOOR);
    }

    #[test]
    fn a_lease_moves_to_another_client_only_within_its_share() {
        let b = budget(8 * CHANNEL_FLOOR, 2 * CHANNEL_FLOOR);
        let mut lease = b.lease(client(1)).unwrap();
        lease.release();
        assert_eq!(b.reserved(), 0);
        let _b1 = b.lease(client(2)).unwrap();
        let _b2 = b.lease(client(2)).unwrap();
        assert!(!lease.claim(client(2), CHANNEL_FLOOR), "client 2 is at its share");
        assert!(lease.claim(client(3), CHANNEL_FLOOR));
        assert_eq!(lease.client(), client(3));
        assert_eq!(b.reserved(), 3 * CHANNEL_FLOOR);
    }
}
