//! What this replica publishes: its local routes, read from the tunnel registry when the
//! publisher asks. The registry is not told about the directory; it only calls an observer that
//! marks hosts dirty (see `Registry::set_observer`).

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use super::entry::RouteEntry;
use crate::rules::Upstream;
use crate::tunnels::{PoolSummary, Registry, Route, TunnelKey};

/// This replica's routes, as the publisher reads them. `Send + Sync`: the publisher task holds
/// it.
pub trait LocalRoutes: Send + Sync {
    /// The route of each of `hosts` served here; a host not served here is absent (its entry
    /// is deleted).
    fn routes(&self, hosts: &HashSet<String>) -> HashMap<String, RouteEntry>;

    /// Every host served here with its route: what a new lease republishes.
    fn all(&self) -> HashMap<String, RouteEntry>;
}

/// A pool member that says how its app is spoken to, once its owner's options are known.
pub(crate) trait SpeaksUpstream {
    fn upstream(&self) -> Option<Upstream>;
}

impl SpeaksUpstream for crate::tunnels::Member {
    fn upstream(&self) -> Option<Upstream> {
        self.gate.upstream()
    }
}

impl<M: SpeaksUpstream + Send + Sync + 'static> LocalRoutes for Registry<M> {
    fn routes(&self, hosts: &HashSet<String>) -> HashMap<String, RouteEntry> {
        with_upstreams(self, route_entries(self.summaries(|h| hosts.contains(h))))
    }

    fn all(&self) -> HashMap<String, RouteEntry> {
        with_upstreams(self, route_entries(self.summaries(|_| true)))
    }
}

/// Each HTTP route says `h2c` or `passthrough` when a member here was opened with it (a pool is
/// as its strictest member), else nothing (HTTP/1.1). An HTTP pool whose options are not all
/// known yet is not published: other replicas would take it for HTTP/1.1 and, for a passthrough
/// tunnel, terminate its TLS. It is published once they are (the gate's settling touches it).
fn with_upstreams<M: SpeaksUpstream + Send + Sync + 'static>(
    registry: &Registry<M>,
    mut routes: HashMap<String, RouteEntry>,
) -> HashMap<String, RouteEntry> {
    for (host, entry) in routes.iter_mut().filter(|(_, e)| e.http > 0) {
        let key = TunnelKey {
            host: host.clone(),
            route: Route::Http,
        };
        if registry.any_member(&key, |m| m.upstream().is_none()) {
            entry.http = 0;
            continue;
        }
        for upstream in [Upstream::Passthrough, Upstream::H2c] {
            if registry.any_member(&key, |m| m.upstream() == Some(upstream)) {
                entry.upstream = upstream;
                break;
            }
        }
    }
    routes.retain(|_, e| e.http > 0 || !e.tcp.is_empty());
    routes
}

/// Folds pools into one entry per host: HTTP members, TCP members per port, the owner's key, and
/// since when the oldest pool has been served. A host's pools all have one owner (a host carries
/// its key's id, and `KeyOwners` gives each id one key); a pool of another owner would be a bug,
/// and is left out rather than published under the wrong key.
pub(crate) fn route_entries(pools: Vec<PoolSummary>) -> HashMap<String, RouteEntry> {
    let mut out: HashMap<String, RouteEntry> = HashMap::new();
    for pool in pools {
        let since = pool.since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let members = u32::try_from(pool.members).unwrap_or(u32::MAX);
        let entry = out.entry(pool.key.host.clone()).or_insert_with(|| RouteEntry {
            key: pool.owner,
            http: 0,
            tcp: Default::default(),
            since,
            upstream: Upstream::Http1,
        });
        if entry.key != pool.owner {
            tracing::warn!(host = %pool.key.host, "pools of one host with two owners; publishing the first");
            continue;
        }
        entry.since = entry.since.min(since);
        match pool.key.route {
            Route::Http => entry.http = entry.http.saturating_add(members),
            Route::Tcp(port) => {
                let n = entry.tcp.entry(port).or_insert(0);
                *n = n.saturating_add(members);
            }
        }
    }
    out
}

/// Unix seconds now, for replica records.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::names::KeyFingerprint;
    use crate::tunnels::TunnelKey;

    const A: KeyFingerprint = KeyFingerprint::from_sha256([1u8; 32]);

    fn key(host: &str, route: Route) -> TunnelKey {
        TunnelKey {
            host: host.into(),
            route,
        }
    }

    /// Member 9 was opened with `upstream=h2c`, 7 with `tls=passthrough`, 8's options are not
    /// known yet, the others are HTTP/1.1.
    impl SpeaksUpstream for u8 {
        fn upstream(&self) -> Option<Upstream> {
            match self {
                9 => Some(Upstream::H2c),
                7 => Some(Upstream::Passthrough),
                8 => None,
                _ => Some(Upstream::Http1),
            }
        }
    }

    #[test]
    fn a_pool_with_an_h2c_member_is_published_as_h2c() {
        let reg = Registry::<u8>::new();
        let _a = reg.register(key("a", Route::Http), A, |_| 1).unwrap();
        let _b = reg.register(key("b", Route::Http), A, |_| 1).unwrap();
        let _b9 = reg.register(key("b", Route::Http), A, |_| 9).unwrap();
        let all = reg.all();
        assert_eq!(all["a"].upstream, Upstream::Http1);
        assert_eq!(all["b"].upstream, Upstream::H2c);
        let _b7 = reg.register(key("b", Route::Http), A, |_| 7).unwrap();
        assert_eq!(
            reg.all()["b"].upstream,
            Upstream::Passthrough,
            "the strictest wins"
        );
        let _c = reg.register(key("c", Route::Http), A, |_| 8).unwrap();
        let _c2 = reg.register(key("c", Route::Tcp(5432)), A, |_| 1).unwrap();
        let _d = reg.register(key("d", Route::Http), A, |_| 8).unwrap();
        let all = reg.all();
        assert_eq!(
            (all["c"].http, all["c"].tcp.len()),
            (0, 1),
            "pending: not published as HTTP"
        );
        assert!(
            !all.contains_key("d"),
            "nothing to publish until its options are known"
        );
    }

    #[test]
    fn the_registry_gives_one_entry_per_host() {
        let reg = Registry::<u8>::new();
        let _h1 = reg.register(key("a", Route::Http), A, |_| 1).unwrap();
        let _h2 = reg.register(key("a", Route::Http), A, |_| 2).unwrap();
        let _t = reg.register(key("a", Route::Tcp(5432)), A, |_| 3).unwrap();
        let _b = reg.register(key("b", Route::Tcp(22)), A, |_| 4).unwrap();
        let all = reg.all();
        assert_eq!(all.len(), 2);
        let a = &all["a"];
        assert_eq!((a.key, a.http, a.tcp.get(&5432)), (A, 2, Some(&1)));
        assert_eq!((all["b"].http, all["b"].tcp.len()), (0, 1));
        let only: HashSet<String> = ["b".to_string(), "gone".to_string()].into();
        let some = reg.routes(&only);
        assert_eq!(
            some.keys().collect::<Vec<_>>(),
            ["b"],
            "a host not served is absent"
        );
    }

    #[test]
    fn since_is_the_oldest_pool_and_a_second_owner_is_left_out() {
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        let pool = |route, owner, since| PoolSummary {
            key: key("a", route),
            owner,
            members: 1,
            since: t(since),
        };
        let out = route_entries(vec![
            pool(Route::Http, A, 20),
            pool(Route::Tcp(1), A, 10),
            pool(Route::Tcp(2), A.colliding(), 5),
        ]);
        let a = &out["a"];
        assert_eq!((a.since, a.http, a.tcp.len()), (10, 1, 1));
    }
}
