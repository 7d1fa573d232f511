//! The cluster directory against a real store: two stores in one process act as two replicas,
//! each with its own lease, publisher and watcher. `etcd` runs them on Debian's `etcd-server`
//! (3.4), `redis` on Debian's `redis-server` (7.0); every test starts its own store on free
//! loopback ports in a temp dir (killed on drop) and prints what it measured; nothing sleeps a
//! fixed time, every wait polls against a deadline.
#![cfg(feature = "store")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
#[path = "../common/process.rs"]
mod process;

#[allow(dead_code)]
#[path = "../common/etcd.rs"]
mod etcd;

#[allow(dead_code)]
#[path = "../common/redis.rs"]
mod redis;

#[cfg(feature = "etcd")]
mod on_etcd;
#[cfg(feature = "redis")]
mod on_redis;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgemux::cluster_store::{encode_route, LocalRoutes, ReplicaId, ReplicaState, RouteEntry, Store};
use edgemux::config::{ClusterConfig, Spread, StoreKind};
use edgemux::names::KeyFingerprint;

/// Deadline for a store to find its peer: generous on a busy machine.
const SETUP: Duration = Duration::from_secs(20);
/// A change published by one replica reaches the other "well under a second".
const PROPAGATION: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(5);
const CLUSTER: &str = "test";

const OWNER: KeyFingerprint = KeyFingerprint::from_sha256([5u8; 32]);
/// Another key: a route under it in a host of [`OWNER`]'s is refused (etcd tests write one).
#[cfg(feature = "etcd")]
const OTHER: KeyFingerprint = KeyFingerprint::from_sha256([6u8; 32]);

/// A replica's local routes, as a test sets them.
#[derive(Default)]
struct Local(Mutex<HashMap<String, RouteEntry>>);

impl LocalRoutes for Local {
    fn routes(&self, hosts: &HashSet<String>) -> HashMap<String, RouteEntry> {
        let all = self.0.lock().unwrap();
        hosts
            .iter()
            .filter_map(|h| all.get(h).map(|e| (h.clone(), e.clone())))
            .collect()
    }

    fn all(&self) -> HashMap<String, RouteEntry> {
        self.0.lock().unwrap().clone()
    }
}

struct Replica {
    store: Store,
    local: Arc<Local>,
}

fn config(endpoint: &str, name: &str, lease_ttl: Duration) -> ClusterConfig {
    let peer: SocketAddr = "127.0.0.1:7443".parse().unwrap();
    ClusterConfig {
        name: CLUSTER.into(),
        replica_name: name.into(),
        store: if endpoint.starts_with("redis") {
            StoreKind::Redis
        } else {
            StoreKind::Etcd
        },
        endpoints: vec![endpoint.into()],
        store_tls: None,
        store_auth_file: None,
        secret_file: "unused".into(),
        lease_ttl,
        keepalive_interval: lease_ttl / 3,
        store_timeout: Duration::from_secs(1),
        fence_after: None,
        spread: Spread::Even,
        peer_bind: peer,
        peer_advertise: peer,
        peer_connect_timeout: Duration::from_secs(1),
        peer_tls: None,
    }
}

impl Replica {
    fn start(cfg: &ClusterConfig) -> Replica {
        let local = Arc::new(Local::default());
        let reserved = |host: &str, key: &KeyFingerprint| host == "vanity.example.com" && *key == OWNER;
        let config_hash = format!("hash-at-start-{}", cfg.replica_name);
        let store = Store::start(cfg, local.clone(), reserved, config_hash).unwrap();
        Replica { store, local }
    }

    fn serve(&self, host: &str, http: u32) {
        let entry = RouteEntry {
            key: OWNER,
            http,
            tcp: BTreeMap::from([(5432, 1)]),
            since: 1,
            upstream: Default::default(),
        };
        self.local.0.lock().unwrap().insert(host.into(), entry);
        self.store.marker().mark(host);
    }

    fn unserve(&self, host: &str) {
        self.local.0.lock().unwrap().remove(host);
        self.store.marker().mark(host);
    }

    /// The HTTP member counts this replica sees `host` served with elsewhere, by replica.
    fn sees(&self, host: &str) -> Vec<(ReplicaId, u32)> {
        self.store
            .lookup()
            .routes(host)
            .into_iter()
            .map(|(rid, e)| (rid, e.http))
            .collect()
    }

    fn knows(&self, other: &Replica) -> bool {
        self.store.lookup().replica(other.store.rid()).is_some()
    }
}

fn host(name: &str) -> String {
    format!("{name}-{}.gw.test", OWNER.key_id())
}

/// Polls `cond` until it holds; the time it took, or a panic naming `what` at `deadline`.
async fn until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "{what}: not within {deadline:?}");
        tokio::time::sleep(POLL).await;
    }
    start.elapsed()
}

/// Two replicas on the store at `endpoint` that know each other.
async fn pair(endpoint: &str, lease_ttl: Duration) -> (Replica, Replica) {
    let a = Replica::start(&config(endpoint, "a", lease_ttl));
    let b = Replica::start(&config(endpoint, "b", lease_ttl));
    let t = until("the replicas find each other", SETUP, || {
        a.knows(&b) && b.knows(&a)
    })
    .await;
    println!("two replicas found each other in {t:?}");
    (a, b)
}

/// A serves three hosts, one member each, and B has seen them all.
async fn serve_three(a: &Replica, b: &Replica) -> Vec<String> {
    let hosts: Vec<String> = (0..3).map(|i| host(&format!("app{i}"))).collect();
    for h in &hosts {
        a.serve(h, 1);
    }
    until("B sees A's routes", PROPAGATION, || {
        hosts.iter().all(|h| b.sees(h).len() == 1)
    })
    .await;
    hosts
}
