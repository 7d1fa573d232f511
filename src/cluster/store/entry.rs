//! The directory's keys and values, with no I/O: where each record lives under the cluster's
//! prefix, what it holds, and the checks a value read from the store passes before anyone routes
//! by it.
//!
//! ```text
//! <prefix><cluster>/replicas/<rid>       {"peer_addr","version","state","started","config_hash"}
//! <prefix><cluster>/routes/<host>/<rid>  {"key","http","tcp":{"5432":n},"since"[,"upstream"]}
//! ```
//!
//! Both live under the writing replica's lease. A host carries its owner's key id, so a route
//! whose host does not belong to its entry's key is dropped on read: config drift or a poisoned
//! store cannot send a visitor to the wrong tunnel.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::cluster_defaults;
use crate::names::{is_domain, is_key_id, KeyFingerprint};
use crate::rules::Upstream;

/// A value is at most this long (SCALEOUT §3.2). Every replica holds every entry: about 200 B
/// typical, 1 KiB at most, keeps 10,000 tunnels × 3 replicas within a few MB.
pub(crate) const MAX_VALUE: usize = 1024;

/// Hex digits of a replica's incarnation (a random `u32` per start): two starts of one replica
/// collide once in ~65,000 restarts, and a collision only matters while the old lease lives.
const INCARNATION_LEN: usize = 8;

/// Ports above this are not TCP ports (`ssh -R` takes a `u32`).
const MAX_PORT: u32 = 65_535;

/// Whether a host may be served by `key` although its first label carries no (or another) key
/// id: the config's vanity hosts (`[[ssh.reserve]]`).
pub(crate) type Reserved = dyn Fn(&str, &KeyFingerprint) -> bool + Send + Sync;

/// Why an entry read from the store was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the value is longer than {MAX_VALUE} bytes")]
    TooLarge,
    #[error("the key is not a directory key")]
    BadKey,
    #[error("the value is not a valid entry")]
    Malformed,
    #[error("the host's key id is not the entry's key's")]
    KeyIdMismatch,
    #[error("the host has no key id and is not reserved for the entry's key")]
    NotReserved,
    #[error("the directory holds its most entries")]
    OverCapacity,
}

impl EntryError {
    /// A bounded metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::BadKey => "bad_key",
            Self::Malformed => "malformed",
            Self::KeyIdMismatch => "key_id_mismatch",
            Self::NotReserved => "not_reserved",
            Self::OverCapacity => "over_capacity",
        }
    }
}

/// A replica's life: its stable name and the incarnation of this start, `<name>.<8 hex>`. A
/// restarted replica never mistakes its previous life's entries for its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(String);

impl ReplicaId {
    /// `replica_name` is a validated `cluster.replica_name` (one DNS label).
    pub fn new(replica_name: &str, incarnation: u32) -> Self {
        Self(format!("{replica_name}.{incarnation:0INCARNATION_LEN$x}"))
    }

    /// A replica id read back from a key; `None` unless it has the form [`Self::new`] gives.
    pub fn parse(text: &str) -> Option<Self> {
        let (name, incarnation) = text.split_once('.')?;
        let name_ok = is_domain(name) && name.bytes().all(|b| !b.is_ascii_uppercase());
        let inc_ok = incarnation.len() == INCARNATION_LEN
            && incarnation
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (name_ok && inc_ok).then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stable part (no incarnation): the one to use as a metric label.
    pub fn replica_name(&self) -> &str {
        self.0.split('.').next().unwrap_or_default()
    }
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a replica takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Serving,
    /// Stopping: put last in pools; its lease is revoked once it is done.
    Draining,
}

/// `replicas/<rid>`: where a replica's peer link listens, and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaEntry {
    pub peer_addr: SocketAddr,
    pub version: String,
    pub state: ReplicaState,
    /// Unix seconds of this start.
    pub started: u64,
    /// The hash of the settings every replica must agree on (`cluster::drift`). Empty in the
    /// record of a replica older than hashes, which never counts as a difference.
    #[serde(default)]
    pub config_hash: String,
}

/// `routes/<host>/<rid>`: what one replica serves under one host. Counts are pool members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// The owner's full key: the one key whose connections serve this host's pools.
    pub key: KeyFingerprint,
    /// HTTP members (0: no HTTP tunnel here).
    pub http: u32,
    /// TCP port → members.
    pub tcp: BTreeMap<u32, u32>,
    /// Unix seconds since the host has been served here.
    pub since: u64,
    /// How the owner's apps are spoken to (`upstream=h2c`); HTTP/1.1 when not said.
    pub upstream: Upstream,
}

/// The JSON form of a [`RouteEntry`]. Unknown fields are ignored, so a newer replica may add
/// some during a rolling upgrade.
#[derive(Serialize, Deserialize)]
struct RouteWire {
    key: String,
    #[serde(default)]
    http: u32,
    #[serde(default)]
    tcp: BTreeMap<String, u32>,
    since: u64,
    /// `h2c` or `passthrough`; absent for HTTP/1.1 (and from replicas older than the option).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
}

/// What a key under the cluster's prefix names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Key {
    Replica(ReplicaId),
    Route { host: String, rid: ReplicaId },
}

/// The cluster's key space: `<prefix><cluster>/`.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

const REPLICAS: &str = "replicas/";
const ROUTES: &str = "routes/";

impl Keys {
    /// `cluster` is a validated `cluster.name` (one DNS label, so it holds no `/`).
    pub fn new(cluster: &str) -> Self {
        Self {
            root: format!("{}{cluster}/", cluster_defaults::PREFIX),
        }
    }

    pub fn replica(&self, rid: &ReplicaId) -> String {
        format!("{}{REPLICAS}{rid}", self.root)
    }

    pub fn route(&self, host: &str, rid: &ReplicaId) -> String {
        format!("{}{ROUTES}{host}/{rid}", self.root)
    }

    /// The prefix of the ACME state (SCALEOUT §3.2 `acme/*`), outside the watched range.
    pub fn acme(&self) -> String {
        format!("{}acme/", self.root)
    }

    /// The key range holding replicas and routes, `[start, end)`: `replicas/` sorts before
    /// `routes/`, and `routes0` is the first key after every `routes/…` (`'0'` follows `'/'`).
    /// One range means one read at one revision and one watch.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn watched(&self) -> (String, String) {
        (
            format!("{}{REPLICAS}", self.root),
            format!("{}routes0", self.root),
        )
    }

    /// What `key` names; `BadKey` for anything else in the range.
    pub(crate) fn parse(&self, key: &[u8]) -> Result<Key, EntryError> {
        let text = std::str::from_utf8(key).map_err(|_| EntryError::BadKey)?;
        let rest = text.strip_prefix(&self.root).ok_or(EntryError::BadKey)?;
        if let Some(rid) = rest.strip_prefix(REPLICAS) {
            return ReplicaId::parse(rid).map(Key::Replica).ok_or(EntryError::BadKey);
        }
        let (host, rid) = rest
            .strip_prefix(ROUTES)
            .and_then(|r| r.rsplit_once('/'))
            .ok_or(EntryError::BadKey)?;
        let rid = ReplicaId::parse(rid).ok_or(EntryError::BadKey)?;
        let lowercase = !host.bytes().any(|b| b.is_ascii_uppercase());
        if !(is_domain(host) && lowercase) {
            return Err(EntryError::BadKey);
        }
        Ok(Key::Route {
            host: host.to_owned(),
            rid,
        })
    }
}

/// The key id a host carries: the `-<keyid>` suffix of its first label, if it has that form.
pub(crate) fn host_key_id(host: &str) -> Option<&str> {
    let label = host.split('.').next()?;
    let (_, id) = label.rsplit_once('-')?;
    is_key_id(id).then_some(id)
}

pub(crate) fn encode_replica(entry: &ReplicaEntry) -> Result<Vec<u8>, EntryError> {
    let value = serde_json::to_vec(entry).map_err(|_| EntryError::Malformed)?;
    bounded(value)
}

pub(crate) fn decode_replica(value: &[u8]) -> Result<ReplicaEntry, EntryError> {
    if value.len() > MAX_VALUE {
        return Err(EntryError::TooLarge);
    }
    serde_json::from_slice(value).map_err(|_| EntryError::Malformed)
}

pub fn encode_route(entry: &RouteEntry) -> Result<Vec<u8>, EntryError> {
    let wire = RouteWire {
        key: entry.key.to_string(),
        http: entry.http,
        tcp: entry.tcp.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
        since: entry.since,
        upstream: (entry.upstream != Upstream::Http1).then(|| entry.upstream.label().to_owned()),
    };
    let value = serde_json::to_vec(&wire).map_err(|_| EntryError::Malformed)?;
    bounded(value)
}

/// Reads a route for `host` and checks that `host` belongs to its key: by the key id in the
/// host, else because `reserved` says the (vanity) host is kept for that key.
pub(crate) fn decode_route(host: &str, value: &[u8], reserved: &Reserved) -> Result<RouteEntry, EntryError> {
    if value.len() > MAX_VALUE {
        return Err(EntryError::TooLarge);
    }
    let wire: RouteWire = serde_json::from_slice(value).map_err(|_| EntryError::Malformed)?;
    let key = KeyFingerprint::parse(&wire.key).ok_or(EntryError::Malformed)?;
    let mut tcp = BTreeMap::new();
    for (port, members) in &wire.tcp {
        let port: u32 = port.parse().map_err(|_| EntryError::Malformed)?;
        if port == 0 || port > MAX_PORT || *members == 0 {
            return Err(EntryError::Malformed);
        }
        tcp.insert(port, *members);
    }
    if wire.http == 0 && tcp.is_empty() {
        return Err(EntryError::Malformed);
    }
    // An upstream this replica does not know is refused, not guessed: the host is then served
    // by its own replica only.
    let upstream = match wire.upstream.as_deref() {
        None | Some("h1") => Upstream::Http1,
        Some("h2c") => Upstream::H2c,
        Some("passthrough") => Upstream::Passthrough,
        Some(_) => return Err(EntryError::Malformed),
    };
    match host_key_id(host) {
        Some(id) if id == key.key_id() => {}
        _ if reserved(host, &key) => {}
        Some(_) => return Err(EntryError::KeyIdMismatch),
        None => return Err(EntryError::NotReserved),
    }
    Ok(RouteEntry {
        key,
        http: wire.http,
        tcp,
        since: wire.since,
        upstream,
    })
}

fn bounded(value: Vec<u8>) -> Result<Vec<u8>, EntryError> {
    if value.len() > MAX_VALUE {
        return Err(EntryError::TooLarge);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FP: KeyFingerprint = KeyFingerprint::from_sha256([3u8; 32]);

    fn none(_: &str, _: &KeyFingerprint) -> bool {
        false
    }

    fn route() -> RouteEntry {
        RouteEntry {
            key: FP,
            http: 2,
            tcp: BTreeMap::from([(5432, 1)]),
            since: 1_700_000_000,
            upstream: Upstream::Http1,
        }
    }

    fn host() -> String {
        format!("app-{}.gw.test", FP.key_id())
    }

    #[test]
    fn keys_round_trip_and_stay_in_the_watched_range() {
        let keys = Keys::new("prod");
        let rid = ReplicaId::new("r1", 0xdead_beef);
        assert_eq!(rid.as_str(), "r1.deadbeef");
        assert_eq!(rid.replica_name(), "r1");
        let (start, end) = keys.watched();
        let replica = keys.replica(&rid);
        let route = keys.route(&host(), &rid);
        assert_eq!(replica, "/edgemux/v1/prod/replicas/r1.deadbeef");
        for k in [&replica, &route] {
            assert!(k.as_str() >= start.as_str() && k.as_str() < end.as_str(), "{k}");
        }
        assert_eq!(keys.parse(replica.as_bytes()), Ok(Key::Replica(rid.clone())));
        assert_eq!(keys.parse(route.as_bytes()), Ok(Key::Route { host: host(), rid }));
    }

    #[test]
    fn foreign_or_broken_keys_are_refused() {
        let keys = Keys::new("prod");
        for bad in [
            "/edgemux/v1/other/replicas/r1.deadbeef",
            "/edgemux/v1/prod/replicas/r1",
            "/edgemux/v1/prod/replicas/r1.DEADBEEF",
            "/edgemux/v1/prod/replicas/r_1.deadbeef",
            "/edgemux/v1/prod/routes/app.gw.test",
            "/edgemux/v1/prod/routes/App.gw.test/r1.deadbeef",
            "/edgemux/v1/prod/routes/a b/r1.deadbeef",
            "/edgemux/v1/prod/routes//r1.deadbeef",
            "/edgemux/v1/prod/routesx",
        ] {
            assert_eq!(keys.parse(bad.as_bytes()), Err(EntryError::BadKey), "{bad}");
        }
        assert_eq!(keys.parse(&[0xff, 0xfe]), Err(EntryError::BadKey));
    }

    #[test]
    fn routes_round_trip() {
        let value = encode_route(&route()).unwrap();
        let text = String::from_utf8(value.clone()).unwrap();
        assert!(text.contains("\"tcp\":{\"5432\":1}"), "{text}");
        assert!(text.contains(&FP.to_string()), "{text}");
        assert_eq!(decode_route(&host(), &value, &none), Ok(route()));
    }

    #[test]
    fn the_upstream_travels_and_an_unknown_one_is_refused() {
        let h2c = RouteEntry {
            upstream: Upstream::H2c,
            ..route()
        };
        let value = encode_route(&h2c).unwrap();
        assert!(String::from_utf8_lossy(&value).contains("\"upstream\":\"h2c\""));
        assert_eq!(decode_route(&host(), &value, &none), Ok(h2c));
        let plain = String::from_utf8(encode_route(&route()).unwrap()).unwrap();
        assert!(
            !plain.contains("upstream"),
            "HTTP/1.1 is said by saying nothing: {plain}"
        );
        let future = plain.replacen('{', "{\"upstream\":\"h3\",", 1);
        assert_eq!(
            decode_route(&host(), future.as_bytes(), &none),
            Err(EntryError::Malformed)
        );
    }

    #[test]
    fn a_host_must_belong_to_its_entry_key() {
        let value = encode_route(&route()).unwrap();
        let other = KeyFingerprint::from_sha256([4u8; 32]);
        let foreign = format!("app-{}.gw.test", other.key_id());
        assert_eq!(
            decode_route(&foreign, &value, &none),
            Err(EntryError::KeyIdMismatch)
        );
        assert_eq!(
            decode_route("app.example.com", &value, &none),
            Err(EntryError::NotReserved),
            "a vanity host needs the config's word"
        );
        let reserved = |h: &str, k: &KeyFingerprint| h == "app.example.com" && *k == FP;
        assert!(decode_route("app.example.com", &value, &reserved).is_ok());
        let colliding = RouteEntry {
            key: FP.colliding(),
            ..route()
        };
        let value = encode_route(&colliding).unwrap();
        assert!(
            decode_route("app.example.com", &value, &reserved).is_err(),
            "the full key is compared, not the key id"
        );
    }

    #[test]
    fn malformed_and_oversized_values_are_refused() {
        let ok = encode_route(&route()).unwrap();
        let text = String::from_utf8(ok).unwrap();
        for bad in [
            String::new(),
            "{}".into(),
            "[1]".into(),
            text.replace("SHA256:", "MD5:"),
            text.replace("\"5432\"", "\"x\""),
            text.replace("\"5432\"", "\"0\""),
            text.replace("\"5432\"", "\"70000\""),
            text.replace("\"5432\":1", "\"5432\":0"),
            text.replace("\"http\":2", "\"http\":-1"),
            text.replace("\"http\":2", "\"http\":0")
                .replace("{\"5432\":1}", "{}"),
        ] {
            assert_eq!(
                decode_route(&host(), bad.as_bytes(), &none),
                Err(EntryError::Malformed),
                "{bad}"
            );
        }
        let padded = text.replace(
            "\"since\"",
            &format!("\"pad\":\"{}\",\"since\"", "x".repeat(MAX_VALUE)),
        );
        assert_eq!(
            decode_route(&host(), padded.as_bytes(), &none),
            Err(EntryError::TooLarge)
        );
        let newer = text.replace("\"since\"", "\"zone\":\"a\",\"since\"");
        assert!(
            decode_route(&host(), newer.as_bytes(), &none).is_ok(),
            "fields a newer replica adds are ignored"
        );
    }

    #[test]
    fn a_route_too_large_to_publish_is_refused_at_encoding() {
        let mut big = route();
        big.tcp = (10_000..10_100).map(|p| (p, 1)).collect();
        assert_eq!(encode_route(&big).map(|v| v.len()), Err(EntryError::TooLarge));
    }

    #[test]
    fn replicas_round_trip() {
        let entry = ReplicaEntry {
            peer_addr: "10.0.0.5:7443".parse().unwrap(),
            version: "0.1.0".into(),
            state: ReplicaState::Draining,
            started: 1,
            config_hash: "0123456789abcdef0123456789abcdef".into(),
        };
        let value = encode_replica(&entry).unwrap();
        assert!(String::from_utf8(value.clone()).unwrap().contains("\"draining\""));
        assert_eq!(decode_replica(&value), Ok(entry));
        assert_eq!(
            decode_replica(br#"{"peer_addr":"nowhere","version":"1","state":"serving","started":1}"#),
            Err(EntryError::Malformed)
        );
        let older = decode_replica(
            br#"{"peer_addr":"10.0.0.5:7443","version":"0.1.0","state":"serving","started":1}"#,
        );
        assert_eq!(
            older.map(|e| e.config_hash),
            Ok(String::new()),
            "a record without a hash still parses"
        );
    }

    #[test]
    fn host_key_ids() {
        assert_eq!(host_key_id("app-abcd2345.gw.test"), Some("abcd2345"));
        assert_eq!(host_key_id("my-app-abcd2345.gw.test"), Some("abcd2345"));
        assert_eq!(host_key_id("app.example.com"), None);
        assert_eq!(host_key_id("app-ABCD2345.gw.test"), None);
        assert_eq!(host_key_id(""), None);
    }
}
