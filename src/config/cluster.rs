//! `[cluster]`: several replicas that act as one. Absent, edgemux is a single node: no store
//! client, no peer listener. Present, it names this replica, the store (etcd, or Redis/Valkey)
//! that holds the directory, the private peer listener, the shared secret, and the timings.
//!
//! The store is picked by `store` or, without it, by the endpoints' scheme: `http://` and
//! `https://` are etcd, `redis://` and `rediss://` (TLS) are Redis. Mixed schemes, or a scheme
//! that is not the named store's, are refused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Collector;

/// Defaults, with where the numbers come from.
pub mod cluster_defaults {
    use std::time::Duration;
    /// Bounds how long a dead host's routes linger; well above etcd's ~2 s minimum lease and its
    /// 1 s election timeout, so a pause or an election never expires a healthy replica.
    pub const LEASE_TTL: Duration = Duration::from_secs(10);
    /// Peers are on the same private network: a dead owner must not hang a visitor.
    pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// A store request that takes longer counts as the store being down.
    pub const STORE_TIMEOUT: Duration = Duration::from_secs(2);
    /// A replica cut from the store fences itself after this: past a default lease (10 s) its
    /// routes have left the other replicas, so its tunnel clients are better served elsewhere.
    pub const FENCE_AFTER: Duration = Duration::from_secs(15);
    pub const PREFIX: &str = "/edgemux/v1/";
    /// The shortest secret accepted: 256 bits.
    pub const MIN_SECRET_BYTES: usize = 32;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// The cluster's name: replicas with the same name and store share one directory.
    pub name: String,
    /// This replica's name; default: the host name.
    pub replica_name: Option<String>,
    /// `etcd` or `redis`; default: from the endpoints' scheme.
    pub store: Option<String>,
    pub endpoints: Vec<String>,
    pub store_tls: Option<RawStoreTls>,
    /// A file with the store's user and password as `user:password` on one line (etcd
    /// authentication, or a Redis ACL user for `AUTH`).
    pub store_auth_file: Option<PathBuf>,
    pub secret_file: PathBuf,
    pub lease_ttl: Option<String>,
    pub keepalive_interval: Option<String>,
    pub store_timeout: Option<String>,
    /// How long the store may be unreachable from here, while a peer still reaches it, before
    /// this replica fences itself; `"off"` or `"0"` never.
    pub fence_after: Option<String>,
    /// `even` (every member of a pool gets an equal share) or `local-first`.
    pub spread: Option<String>,
    pub peer: RawPeer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStoreTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    /// The private peer listener; never behind the public load balancer.
    pub bind: String,
    /// The address other replicas dial; default: `bind` (which must then not be unspecified).
    pub advertise: Option<String>,
    pub connect_timeout: Option<String>,
    /// The peer link's TLS from files (all three, or none: derived from the secret).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The peer link's TLS given as files: a CA trusted for the peer link only, and this replica's
/// chain and key (its certificate must allow both server and client authentication).
#[derive(Debug, Clone)]
pub struct PeerTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How requests for a pool whose members sit on several replicas are spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Every member, wherever it is connected, gets an equal share.
    Even,
    /// Local members when there are any, else remote ones.
    LocalFirst,
}

/// Which store holds the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// etcd v3: a lease per replica, a watch (`http://`, `https://`).
    Etcd,
    /// Redis 7 or Valkey, one primary: TTL keys and a stream (`redis://`, `rediss://`).
    Redis,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::Redis => "redis",
        }
    }

    /// The store an endpoint's scheme names.
    fn of_endpoint(endpoint: &str) -> Option<Self> {
        let scheme = endpoint.split_once("://")?.0;
        match scheme {
            "http" | "https" => Some(Self::Etcd),
            "redis" | "rediss" => Some(Self::Redis),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreTls {
    pub ca: PathBuf,
    /// Client certificate and key, when the store asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The validated `[cluster]` section.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    pub replica_name: String,
    pub store: StoreKind,
    pub endpoints: Vec<String>,
    pub store_tls: Option<StoreTls>,
    pub store_auth_file: Option<PathBuf>,
    pub secret_file: PathBuf,
    pub lease_ttl: Duration,
    pub keepalive_interval: Duration,
    pub store_timeout: Duration,
    /// `None`: never fence (see `cluster::fence`).
    pub fence_after: Option<Duration>,
    pub spread: Spread,
    pub peer_bind: SocketAddr,
    pub peer_advertise: SocketAddr,
    pub peer_connect_timeout: Duration,
    /// `None`: certificates derived from the cluster secret.
    pub peer_tls: Option<PeerTlsFiles>,
}

impl ClusterConfig {
    /// A config for unit tests of the store backends: replica `r1` of cluster `prod` on
    /// `endpoint`, with its files under `dir` (none is read until a test sets one).
    #[cfg(test)]
    pub(crate) fn for_tests(dir: &std::path::Path, store: StoreKind, endpoint: &str) -> Self {
        let peer = SocketAddr::from(([127, 0, 0, 1], 7443));
        Self {
            name: "prod".into(),
            replica_name: "r1".into(),
            store,
            endpoints: vec![endpoint.into()],
            store_tls: None,
            store_auth_file: None,
            secret_file: dir.join("secret"),
            lease_ttl: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(3),
            store_timeout: Duration::from_secs(2),
            fence_after: None,
            spread: Spread::Even,
            peer_bind: peer,
            peer_advertise: peer,
            peer_connect_timeout: Duration::from_secs(1),
            peer_tls: None,
        }
    }
}

/// A cluster or replica name: one DNS label, so it fits a store key and a certificate name.
fn is_name(s: &str) -> bool {
    crate::names::is_domain(s) && !s.contains('.')
}

fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_ascii_lowercase();
    let label = name.split('.').next().unwrap_or_default().to_owned();
    is_name(&label).then_some(label)
}

/// The store `store` names, or the endpoints' scheme; every endpoint must name the same one.
/// Redis is one primary, so one endpoint.
fn store_kind(c: &mut Collector, raw: &RawCluster) -> StoreKind {
    let named = match raw.store.as_deref() {
        None => None,
        Some("etcd") => Some(StoreKind::Etcd),
        Some("redis") => Some(StoreKind::Redis),
        Some(other) => {
            c.push(
                "cluster.store",
                format!("{other:?} is not a supported store (\"etcd\" or \"redis\")"),
            );
            None
        }
    };
    if raw.endpoints.is_empty() {
        c.push(
            "cluster.endpoints",
            "list the store's endpoints, e.g. [\"https://10.0.0.10:2379\"] (etcd) or [\"rediss://10.0.0.10:6379\"] (Redis)",
        );
    }
    let mut kind = named;
    for (i, e) in raw.endpoints.iter().enumerate() {
        let at = format!("cluster.endpoints[{i}]");
        match (StoreKind::of_endpoint(e), kind) {
            (None, _) => c.push(
                at,
                format!("{e:?} is not an http://, https:// (etcd), redis:// or rediss:// (Redis) URL"),
            ),
            (Some(k), Some(want)) if k != want => c.push(
                at,
                format!(
                    "{e:?} is a {} endpoint, but {}: every endpoint must name one store",
                    k.as_str(),
                    if named.is_some() {
                        format!("store = {:?}", want.as_str())
                    } else {
                        format!("endpoints[0] is {}", want.as_str())
                    }
                ),
            ),
            (Some(k), _) => kind = Some(k),
        }
    }
    let kind = kind.unwrap_or(StoreKind::Etcd);
    if kind == StoreKind::Redis && raw.endpoints.len() > 1 {
        c.push(
            "cluster.endpoints",
            "Redis is one primary: give one redis:// or rediss:// endpoint (Sentinel and Redis Cluster are not supported)",
        );
    }
    kind
}

pub(super) fn validate(c: &mut Collector, raw: &RawCluster) -> Option<ClusterConfig> {
    let at = |key: &str| format!("cluster.{key}");
    if !is_name(&raw.name) {
        c.push(
            at("name"),
            format!("{:?} is not a name (one DNS label: a-z, 0-9, -)", raw.name),
        );
    }
    let replica_name = match &raw.replica_name {
        Some(n) if is_name(n) => n.clone(),
        Some(n) => {
            c.push(
                at("replica_name"),
                format!("{n:?} is not a name (one DNS label: a-z, 0-9, -)"),
            );
            String::new()
        }
        None => host_name().unwrap_or_else(|| {
            c.push(
                at("replica_name"),
                "the host name is not a DNS label: set replica_name",
            );
            String::new()
        }),
    };
    let store = store_kind(c, raw);
    let store_tls = raw.store_tls.as_ref().and_then(|t| match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => Some(StoreTls {
            ca: t.ca.clone(),
            identity: Some((cert.clone(), key.clone())),
        }),
        (None, None) => Some(StoreTls {
            ca: t.ca.clone(),
            identity: None,
        }),
        _ => {
            c.push(at("store_tls"), "give both cert and key, or neither");
            None
        }
    });
    let lease_ttl = c.duration(
        &at("lease_ttl"),
        raw.lease_ttl.as_deref(),
        cluster_defaults::LEASE_TTL,
    );
    if lease_ttl < Duration::from_secs(3) {
        c.push(
            at("lease_ttl"),
            "must be at least 3s (etcd's shortest lease is about 2s)",
        );
    }
    let keepalive_interval = c.duration(
        &at("keepalive_interval"),
        raw.keepalive_interval.as_deref(),
        lease_ttl / 3,
    );
    if keepalive_interval.is_zero() || keepalive_interval >= lease_ttl {
        c.push(
            at("keepalive_interval"),
            "must be greater than zero and shorter than lease_ttl",
        );
    }
    let store_timeout = c.duration(
        &at("store_timeout"),
        raw.store_timeout.as_deref(),
        cluster_defaults::STORE_TIMEOUT,
    );
    let fence_after = match raw.fence_after.as_deref() {
        Some("off" | "0") => None,
        other => Some(c.duration(&at("fence_after"), other, cluster_defaults::FENCE_AFTER))
            .filter(|d| !d.is_zero()),
    };
    let spread = match raw.spread.as_deref() {
        None | Some("even") => Spread::Even,
        Some("local-first") => Spread::LocalFirst,
        Some(other) => {
            c.push(
                at("spread"),
                format!("{other:?} is not \"even\" or \"local-first\""),
            );
            Spread::Even
        }
    };
    let addr = |c: &mut Collector, key: &str, text: &str| {
        text.parse::<SocketAddr>()
            .map_err(|_| c.push(at(key), format!("{text:?} is not an address:port")))
            .ok()
    };
    let peer_bind = addr(c, "peer.bind", &raw.peer.bind);
    let peer_advertise = match &raw.peer.advertise {
        Some(a) => addr(c, "peer.advertise", a),
        None => peer_bind,
    };
    if peer_advertise.is_some_and(|a| a.ip().is_unspecified()) {
        c.push(
            at("peer.advertise"),
            "other replicas cannot dial an unspecified address: set peer.advertise to this replica's private address",
        );
    }
    if !raw.secret_file.is_file() {
        c.push(
            at("secret_file"),
            format!(
                "{} does not exist or is not a file (make one with `edgemux cluster-secret > FILE`)",
                raw.secret_file.display()
            ),
        );
    }
    let peer_connect_timeout = c.duration(
        &at("peer.connect_timeout"),
        raw.peer.connect_timeout.as_deref(),
        cluster_defaults::PEER_CONNECT_TIMEOUT,
    );
    let peer_tls = match (&raw.peer.ca, &raw.peer.cert, &raw.peer.key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => Some(PeerTlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => {
            c.push(
                at("peer"),
                "give ca, cert and key for the peer link's TLS, or none (certificates derived from the secret)",
            );
            None
        }
    };
    Some(ClusterConfig {
        name: raw.name.clone(),
        replica_name,
        store,
        endpoints: raw.endpoints.clone(),
        store_tls,
        store_auth_file: raw.store_auth_file.clone(),
        secret_file: raw.secret_file.clone(),
        lease_ttl,
        keepalive_interval,
        store_timeout,
        fence_after,
        spread,
        peer_bind: peer_bind?,
        peer_advertise: peer_advertise?,
        peer_connect_timeout,
        peer_tls,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::Spread;

    fn with_cluster(secret: &std::path::Path, section: &str) -> String {
        format!(
            "domain = \"gw.test\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n[cluster]\nname = \"prod\"\n\
             endpoints = [\"http://127.0.0.1:2379\"]\nsecret_file = {secret:?}\n{section}"
        )
    }

    #[test]
    fn a_cluster_gets_documented_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "00").unwrap();
        let text = with_cluster(
            &secret,
            "replica_name = \"r1\"\n[cluster.peer]\nbind = \"10.0.0.5:7443\"\n",
        );
        let c = crate::config::parse(&text).unwrap().cluster.unwrap();
        assert_eq!(c.replica_name, "r1");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.keepalive_interval, c.lease_ttl / 3);
        assert_eq!(c.spread, Spread::Even);
        assert_eq!(c.fence_after, Some(Duration::from_secs(15)));
        assert_eq!(c.peer_advertise, c.peer_bind);
        assert!(c.peer_tls.is_none(), "derived from the secret by default");
        assert!(crate::config::parse(&text.replace("[cluster]", "[clusterx]")).is_err());
    }

    #[test]
    fn fencing_can_be_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "00").unwrap();
        let fence = |value: &str| {
            let section = format!(
                "replica_name = \"r1\"\nfence_after = {value:?}\n[cluster.peer]\nbind = \"10.0.0.5:7443\"\n"
            );
            crate::config::parse(&with_cluster(&secret, &section)).map(|c| c.cluster.unwrap().fence_after)
        };
        assert_eq!(fence("3s").unwrap(), Some(Duration::from_secs(3)));
        assert_eq!(fence("off").unwrap(), None);
        assert_eq!(fence("0s").unwrap(), None);
        assert_eq!(fence("0").unwrap(), None);
        let err = fence("soon").unwrap_err();
        assert!(err.iter().any(|p| p.path == "cluster.fence_after"), "{err:?}");
    }

    #[test]
    fn cluster_problems_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("missing");
        let text = with_cluster(
            &secret,
            "replica_name = \"r_1\"\nlease_ttl = \"1s\"\nspread = \"random\"\n\
             [cluster.peer]\nbind = \"0.0.0.0:7443\"\nca = \"ca.pem\"\n",
        )
        .replace("http://127.0.0.1:2379", "127.0.0.1:2379");
        let paths: Vec<String> = crate::config::parse(&text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.path)
            .collect();
        for want in [
            "cluster.replica_name",
            "cluster.endpoints[0]",
            "cluster.lease_ttl",
            "cluster.spread",
            "cluster.peer.advertise",
            "cluster.secret_file",
            "cluster.peer",
        ] {
            assert!(paths.iter().any(|p| p == want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn the_store_follows_the_endpoints_or_names_them() {
        use super::StoreKind;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "00").unwrap();
        let store = |store: &str, endpoints: &str| {
            let section =
                format!("replica_name = \"r1\"\n{store}\n[cluster.peer]\nbind = \"10.0.0.5:7443\"\n");
            let text = with_cluster(&secret, &section).replace("[\"http://127.0.0.1:2379\"]", endpoints);
            crate::config::parse(&text).map(|c| c.cluster.unwrap().store)
        };
        let problem = |store: &str, endpoints: &str| {
            let err = self::store_err(store, endpoints, &secret);
            err.into_iter().map(|p| (p.path, p.message)).collect::<Vec<_>>()
        };
        assert_eq!(
            store("", "[\"http://a:2379\", \"https://b:2379\"]").unwrap(),
            StoreKind::Etcd
        );
        assert_eq!(store("", "[\"redis://a:6379\"]").unwrap(), StoreKind::Redis);
        assert_eq!(
            store("store = \"redis\"", "[\"rediss://a:6379\"]").unwrap(),
            StoreKind::Redis
        );
        let mixed = problem("", "[\"redis://a:6379\", \"http://b:2379\"]");
        assert!(
            mixed
                .iter()
                .any(|(p, m)| p == "cluster.endpoints[1]" && m.contains("one store")),
            "{mixed:?}"
        );
        let named = problem("store = \"etcd\"", "[\"redis://a:6379\"]");
        assert!(
            named
                .iter()
                .any(|(p, m)| p == "cluster.endpoints[0]" && m.contains("store = \"etcd\"")),
            "{named:?}"
        );
        let two = problem("", "[\"redis://a:6379\", \"redis://b:6379\"]");
        assert!(
            two.iter()
                .any(|(p, m)| p == "cluster.endpoints" && m.contains("one primary")),
            "{two:?}"
        );
        let unknown = problem("store = \"consul\"", "[\"http://a:2379\"]");
        assert!(unknown.iter().any(|(p, _)| p == "cluster.store"), "{unknown:?}");
    }

    fn store_err(store: &str, endpoints: &str, secret: &std::path::Path) -> Vec<crate::config::Problem> {
        let section = format!("replica_name = \"r1\"\n{store}\n[cluster.peer]\nbind = \"10.0.0.5:7443\"\n");
        let text = with_cluster(secret, &section).replace("[\"http://127.0.0.1:2379\"]", endpoints);
        crate::config::parse(&text).unwrap_err()
    }
}
