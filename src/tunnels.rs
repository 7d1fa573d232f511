//! The tunnel registry: host → pool of SSH connections that serve it.
//!
//! Registering returns a [`Registration`] guard whose drop removes the member, so a dying SSH
//! connection can never leave a stale route. All access goes through [`Registry`]'s few methods,
//! so a distributed implementation can replace it without touching the HTTP or SSH paths.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// HTTP tunnels (ports 80 and 443) are public by Host; everything else is a private TCP tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Http,
    Tcp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }

    pub fn for_port(port: u32) -> Self {
        match port {
            80 | 443 => Self::Http,
            _ => Self::Tcp,
        }
    }
}

/// What a pool is found by: the host, and the port for TCP tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TunnelKey {
    pub host: String,
    pub route: Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Http,
    Tcp(u32),
}

impl Route {
    pub fn kind(self) -> Kind {
        match self {
            Self::Http => Kind::Http,
            Self::Tcp(_) => Kind::Tcp,
        }
    }

    pub fn for_port(port: u32) -> Self {
        match Kind::for_port(port) {
            Kind::Http => Self::Http,
            Kind::Tcp => Self::Tcp(port),
        }
    }
}

/// One SSH connection serving a tunnel.
#[derive(Debug)]
pub struct Member {
    /// The SSH connection's id, for logs and the admin API.
    pub conn: u64,
    pub keyid: String,
    pub name: String,
    /// The `tcpip-forward` address and port exactly as the client sent them: OpenSSH refuses a
    /// `forwarded-tcpip` channel that does not echo them.
    pub bind_address: String,
    pub bind_port: u32,
    pub client: SocketAddr,
    /// The AWS VPC endpoint the client came through, when an NLB said so (PROXY v2 TLV 0xEA).
    pub vpce: Option<String>,
    pub since: SystemTime,
    pub handle: russh::server::Handle,
    /// Kept-alive HTTP connections into this member.
    pub idle: crate::http::upstream::IdleConns,
    pub stats: Arc<MemberStats>,
}

/// Traffic through one pool member, for the admin API.
#[derive(Debug, Default)]
pub struct MemberStats {
    /// Bytes received from the tunnel client.
    pub bytes_in: AtomicU64,
    /// Bytes sent to the tunnel client.
    pub bytes_out: AtomicU64,
    pub requests: AtomicU64,
    pub open_channels: AtomicUsize,
}

impl MemberStats {
    /// Takes a channel place under `limit` (`limits.channels_per_tunnel`), or `None` when full.
    pub fn try_open(self: &Arc<Self>, limit: usize) -> Option<ChannelSlot> {
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
pub struct ChannelSlot(Arc<MemberStats>);

impl ChannelSlot {
    pub fn stats(&self) -> &MemberStats {
        &self.0
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.open_channels.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The registry of the running gateway.
pub type Tunnels = Registry<Member>;

#[derive(Debug)]
struct Pool<M> {
    members: Vec<(u64, Arc<M>)>,
    next: AtomicUsize,
}

impl<M> Default for Pool<M> {
    fn default() -> Self {
        Self {
            members: Vec::new(),
            next: AtomicUsize::new(0),
        }
    }
}

/// Generic over the member so its logic is unit-tested without SSH sessions.
#[derive(Debug)]
pub struct Registry<M> {
    pools: Mutex<HashMap<TunnelKey, Pool<M>>>,
    ids: AtomicU64,
}

impl<M: Send + Sync + 'static> Registry<M> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            pools: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TunnelKey, Pool<M>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `member` to the pool for `key`. Only the key id in the host can own it, so every member
    /// of a pool belongs to the same key.
    pub fn register(self: &Arc<Self>, key: TunnelKey, member: M) -> Registration<M> {
        let member = Arc::new(member);
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let size = {
            let mut pools = self.lock();
            let pool = pools.entry(key.clone()).or_default();
            pool.members.push((id, member.clone()));
            pool.members.len()
        };
        crate::metrics::tunnel_member(key.route.kind().as_str(), true, size == 1);
        tracing::info!(host = %key.host, route = ?key.route, pool_size = size, "tunnel registered");
        Registration {
            registry: self.clone(),
            key,
            id,
            member,
        }
    }

    fn deregister(&self, key: &TunnelKey, id: u64) {
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(key) else {
            return;
        };
        pool.members.retain(|(m, _)| *m != id);
        let left = pool.members.len();
        if left == 0 {
            pools.remove(key);
        }
        drop(pools);
        crate::metrics::tunnel_member(key.route.kind().as_str(), false, left == 0);
        tracing::info!(host = %key.host, route = ?key.route, pool_size = left, "tunnel member removed");
    }

    /// The members of a pool, starting at the round-robin cursor: try them in order, so a failing
    /// member is skipped and the next one serves.
    pub fn members(&self, key: &TunnelKey) -> Vec<Arc<M>> {
        let pools = self.lock();
        let Some(pool) = pools.get(key) else {
            return Vec::new();
        };
        let n = pool.members.len();
        let start = pool.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        (0..n)
            .filter_map(|i| pool.members.get((start + i) % n).map(|(_, m)| m.clone()))
            .collect()
    }

    /// How many members, across all pools, satisfy `pred` (one pass, no copies).
    pub fn count(&self, pred: impl Fn(&M) -> bool) -> usize {
        let pools = self.lock();
        pools
            .values()
            .flat_map(|p| &p.members)
            .filter(|(_, m)| pred(m))
            .count()
    }

    /// Whether a pool exists for `key` (no round-robin side effect, unlike [`Self::members`]).
    pub fn contains(&self, key: &TunnelKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Every tunnel with its members, sorted by host then route.
    pub fn snapshot(&self) -> Vec<(TunnelKey, Vec<Arc<M>>)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(k, p)| (k.clone(), p.members.iter().map(|(_, m)| m.clone()).collect()))
            .collect();
        all.sort_by(|a, b| (&a.0.host, route_order(a.0.route)).cmp(&(&b.0.host, route_order(b.0.route))));
        all
    }
}

fn route_order(r: Route) -> u32 {
    match r {
        Route::Http => 0,
        Route::Tcp(p) => p,
    }
}

/// Keeps a member registered; dropping it deregisters.
#[derive(Debug)]
pub struct Registration<M: Send + Sync + 'static> {
    registry: Arc<Registry<M>>,
    key: TunnelKey,
    id: u64,
    member: Arc<M>,
}

impl<M: Send + Sync + 'static> Registration<M> {
    pub fn key(&self) -> &TunnelKey {
        &self.key
    }

    pub fn member(&self) -> &Arc<M> {
        &self.member
    }
}

impl<M: Send + Sync + 'static> Drop for Registration<M> {
    fn drop(&mut self) {
        self.registry.deregister(&self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: &str) -> TunnelKey {
        TunnelKey {
            host: host.into(),
            route: Route::Http,
        }
    }

    #[test]
    fn pool_round_robin_and_guard_drop() {
        let reg = Registry::<&'static str>::new();
        let a = reg.register(key("h"), "a");
        let b = reg.register(key("h"), "b");
        let firsts: Vec<&str> = (0..4).map(|_| *reg.members(&key("h"))[0]).collect();
        assert_eq!(firsts, ["a", "b", "a", "b"]);
        assert_eq!(reg.members(&key("h")).len(), 2);
        drop(a);
        assert_eq!(
            reg.members(&key("h")).iter().map(|m| **m).collect::<Vec<_>>(),
            ["b"]
        );
        drop(b);
        assert!(reg.members(&key("h")).is_empty());
        assert!(reg.snapshot().is_empty(), "an empty pool is removed");
    }

    #[test]
    fn routes_are_separate() {
        let reg = Registry::<u8>::new();
        let _http = reg.register(key("h"), 1);
        let tcp = TunnelKey {
            host: "h".into(),
            route: Route::for_port(5432),
        };
        let _t = reg.register(tcp.clone(), 2);
        assert_eq!(*reg.members(&tcp)[0], 2);
        assert_eq!(Route::for_port(443), Route::Http);
        assert_eq!(reg.snapshot().len(), 2);
    }
}
