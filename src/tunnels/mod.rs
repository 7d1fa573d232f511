//! The tunnel registry: host → pool of SSH connections that serve it. It knows members and
//! pools, nothing of HTTP.
//!
//! Registering returns a [`Registration`] guard whose drop removes the member, so a dying SSH
//! connection can never leave a stale route. The HTTP proxy and `ssh -L` reach tunnels only
//! through the [`Directory`] seam, so a distributed directory can be added beside the registry
//! without touching them.

mod directory;
mod member;
mod owners;
mod report;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use crate::names::KeyFingerprint;

pub(crate) use directory::{
    first_member, Directory, Finding, Opened, Opening, Reach, RemoteMembers, RemoteTunnel, Visitor, WeakReach,
};
pub(crate) use member::{ChannelSlot, Member, MemberId, Refused};
pub(crate) use owners::KeyOwners;
pub(crate) use report::tunnels_json;

/// HTTP tunnels (ports 80 and 443) are public by Host; everything else is a private TCP tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    Http,
    Tcp,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }

    pub(crate) fn for_port(port: u32) -> Self {
        match port {
            80 | 443 => Self::Http,
            _ => Self::Tcp,
        }
    }
}

/// What a pool is found by: the host, and the port for TCP tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TunnelKey {
    pub(crate) host: String,
    pub(crate) route: Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Route {
    Http,
    Tcp(u32),
}

impl Route {
    pub(crate) fn kind(self) -> Kind {
        match self {
            Self::Http => Kind::Http,
            Self::Tcp(_) => Kind::Tcp,
        }
    }

    pub(crate) fn for_port(port: u32) -> Self {
        match Kind::for_port(port) {
            Kind::Http => Self::Http,
            Kind::Tcp => Self::Tcp(port),
        }
    }
}

/// The registry of the running gateway.
pub(crate) type Tunnels = Registry<Member>;

#[derive(Debug)]
struct Pool<M> {
    /// The one key whose connections may serve this pool.
    owner: KeyFingerprint,
    members: Vec<(u64, Arc<M>)>,
    next: AtomicUsize,
    /// When its first member registered.
    since: SystemTime,
}

/// One pool, summed up: what the cluster directory publishes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolSummary {
    pub(crate) key: TunnelKey,
    pub(crate) owner: KeyFingerprint,
    pub(crate) members: usize,
    pub(crate) since: SystemTime,
}

/// Told of every pool whose members changed, after the change (see [`Registry::set_observer`]).
pub(crate) type Observer = Box<dyn Fn(&TunnelKey) + Send + Sync>;

struct ObserverSlot(Observer);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// A pool is served by one key only: `owner` holds it. (The message, shown to the refused
/// client, does not name the owner.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host} is served by another key")]
pub(crate) struct PoolOwned {
    pub(crate) host: String,
    pub(crate) owner: KeyFingerprint,
}

/// Generic over the member so its logic is unit-tested without SSH sessions.
#[derive(Debug)]
pub(crate) struct Registry<M> {
    pools: Mutex<HashMap<TunnelKey, Pool<M>>>,
    ids: AtomicU64,
    observer: OnceLock<ObserverSlot>,
}

impl<M: Send + Sync + 'static> Registry<M> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pools: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
            observer: OnceLock::new(),
        })
    }

    /// Sets the one observer, called after every register and deregister with the pool's key,
    /// outside the registry's lock (it may read the registry). `false`: one was set already.
    pub(crate) fn set_observer(&self, observer: Observer) -> bool {
        self.observer.set(ObserverSlot(observer)).is_ok()
    }

    /// Tells the observer that something it reads of `key`'s pool changed without a member
    /// coming or going (a member's options became known).
    pub(crate) fn touch(&self, key: &TunnelKey) {
        self.changed(key);
    }

    fn changed(&self, key: &TunnelKey) {
        if let Some(ObserverSlot(observe)) = self.observer.get() {
            observe(key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TunnelKey, Pool<M>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the member that `make` builds (given its id) to the pool for `key`, served by
    /// `owner`. A pool belongs to one full key: another key is refused, even one whose short id
    /// (and so whose host name) is the same.
    pub(crate) fn register(
        self: &Arc<Self>,
        key: TunnelKey,
        owner: KeyFingerprint,
        make: impl FnOnce(MemberId) -> M,
    ) -> Result<Registration<M>, PoolOwned> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let (member, size) = {
            let mut pools = self.lock();
            let pool = pools.entry(key.clone()).or_insert_with(|| Pool {
                owner,
                members: Vec::new(),
                next: AtomicUsize::new(0),
                since: SystemTime::now(),
            });
            if pool.owner != owner {
                return Err(PoolOwned {
                    host: key.host,
                    owner: pool.owner,
                });
            }
            let member = Arc::new(make(id));
            pool.members.push((id, member.clone()));
            (member, pool.members.len())
        };
        crate::metrics::tunnel_member(key.route.kind().as_str(), true, size == 1);
        tracing::info!(host = %key.host, route = ?key.route, pool_size = size, "tunnel registered");
        self.changed(&key);
        Ok(Registration {
            registry: self.clone(),
            key,
            id,
            member,
        })
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
        self.changed(key);
    }

    /// The members of a pool, starting at the round-robin cursor: try them in order, so a failing
    /// member is skipped and the next one serves.
    pub(crate) fn members(&self, key: &TunnelKey) -> Vec<Arc<M>> {
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
    pub(crate) fn count(&self, pred: impl Fn(&M) -> bool) -> usize {
        let pools = self.lock();
        pools
            .values()
            .flat_map(|p| &p.members)
            .filter(|(_, m)| pred(m))
            .count()
    }

    /// The members of a pool in registration order (no round-robin side effect).
    pub(crate) fn members_in_place(&self, key: &TunnelKey) -> Vec<Arc<M>> {
        self.lock()
            .get(key)
            .map(|p| p.members.iter().map(|(_, m)| m.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether a member of `key`'s pool satisfies `pred` (no round-robin side effect, no copies).
    pub(crate) fn any_member(&self, key: &TunnelKey, pred: impl Fn(&M) -> bool) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|p| p.members.iter().any(|(_, m)| pred(m)))
    }

    /// Whether a pool exists for `key` (no round-robin side effect, unlike [`Self::members`]).
    pub(crate) fn contains(&self, key: &TunnelKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Every pool whose host `wanted` selects, summed up (one pass, no member copies).
    pub(crate) fn summaries(&self, wanted: impl Fn(&str) -> bool) -> Vec<PoolSummary> {
        self.lock()
            .iter()
            .filter(|(k, _)| wanted(&k.host))
            .map(|(k, p)| PoolSummary {
                key: k.clone(),
                owner: p.owner,
                members: p.members.len(),
                since: p.since,
            })
            .collect()
    }

    /// Every tunnel with its members, sorted by host then route.
    pub(crate) fn snapshot(&self) -> Vec<(TunnelKey, Vec<Arc<M>>)> {
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
pub(crate) struct Registration<M: Send + Sync + 'static> {
    registry: Arc<Registry<M>>,
    key: TunnelKey,
    id: u64,
    member: Arc<M>,
}

impl<M: Send + Sync + 'static> Registration<M> {
    pub(crate) fn key(&self) -> &TunnelKey {
        &self.key
    }

    pub(crate) fn member(&self) -> &Arc<M> {
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: KeyFingerprint = KeyFingerprint::from_sha256([1u8; 32]);

    fn key(host: &str) -> TunnelKey {
        TunnelKey {
            host: host.into(),
            route: Route::Http,
        }
    }

    #[test]
    fn pool_round_robin_and_guard_drop() {
        let reg = Registry::<&'static str>::new();
        let a = reg.register(key("h"), A, |_| "a").unwrap();
        let b = reg.register(key("h"), A, |_| "b").unwrap();
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
        let _http = reg.register(key("h"), A, |_| 1).unwrap();
        let tcp = TunnelKey {
            host: "h".into(),
            route: Route::for_port(5432),
        };
        let _t = reg.register(tcp.clone(), A, |_| 2).unwrap();
        assert_eq!(*reg.members(&tcp)[0], 2);
        assert_eq!(Route::for_port(443), Route::Http);
        assert_eq!(reg.snapshot().len(), 2);
    }

    #[test]
    fn the_observer_hears_every_change_and_may_read_the_registry() {
        let reg = Registry::<u8>::new();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (log, weak) = (heard.clone(), Arc::downgrade(&reg));
        let observer: Observer = Box::new(move |k: &TunnelKey| {
            let members = weak.upgrade().map_or(0, |r| r.summaries(|h| h == k.host).len());
            log.lock().unwrap().push((k.host.clone(), members));
        });
        assert!(reg.set_observer(observer));
        assert!(!reg.set_observer(Box::new(|_| {})), "one observer");
        let a = reg.register(key("h"), A, |_| 1).unwrap();
        let b = reg.register(key("h"), A, |_| 2).unwrap();
        assert!(reg.register(key("h"), A.colliding(), |_| 3).is_err());
        drop(a);
        drop(b);
        let heard = heard.lock().unwrap().clone();
        assert_eq!(
            heard,
            [("h".into(), 1), ("h".into(), 1), ("h".into(), 1), ("h".into(), 0)],
            "called outside the lock, after the change; a refusal changes nothing"
        );
    }

    #[test]
    fn summaries_give_owner_and_member_count() {
        let reg = Registry::<u8>::new();
        let _a = reg.register(key("h"), A, |_| 1).unwrap();
        let _b = reg.register(key("h"), A, |_| 2).unwrap();
        let _c = reg.register(key("other"), A, |_| 3).unwrap();
        let s = reg.summaries(|h| h == "h");
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].key.clone(), s[0].owner, s[0].members), (key("h"), A, 2));
    }

    #[test]
    fn a_key_whose_short_id_collides_cannot_join_the_pool() {
        let reg = Registry::<&'static str>::new();
        let _owner = reg.register(key("app-x"), A, |_| "owner").unwrap();
        let refused = reg.register(key("app-x"), A.colliding(), |_| "attacker");
        assert_eq!(refused.unwrap_err().owner, A);
        let members: Vec<&str> = reg.members(&key("app-x")).iter().map(|m| **m).collect();
        assert_eq!(members, ["owner"], "no visitor request reaches the attacker");
    }
}
