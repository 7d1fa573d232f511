//! The cluster's [`Directory`]: a host's members are this replica's own (from the local
//! directory) and those of other replicas (from the store's in-memory copy), in the order
//! `select` gives; a channel to another replica's members is a stream over the peer link, which
//! the owner splices to a `forwarded-tcpip` channel of its own. Routing never waits on the store.

use std::collections::HashMap;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::eject::{Change, Ejections, Outcome};
use super::listing::Listed;
use super::peer::codec::{Op, PeerRequest};
use super::peer::link::client::{PeerClient, PeerError};
use super::select::{self, Candidate, Target};
use super::store::{Lookup, ReplicaId, ReplicaState, RouteEntry};
use crate::config::Spread;
use crate::rules::Upstream;
use crate::tunnels::{
    Directory, Finding, MemberId, Opened, Opening, Reach, RemoteMembers, RemoteTunnel, Route, TunnelKey,
    Visitor,
};

/// Ids of other replicas' member groups have the top bit set, so they never meet a local
/// member's id (a counter from 0) in the upstream pool.
const REMOTE_ID_BIT: MemberId = 1 << 63;
/// Remote member groups remembered before the ones whose routes have gone are swept.
const SWEEP_AT: usize = 4096;
/// While the store does not answer, where other replicas said a host is held is reused this
/// long, so a burst of requests for one host asks once.
const LOOKUP_TTL: Duration = Duration::from_secs(2);
/// And that no replica holds it, this long: a tunnel registered a moment later is found soon.
const MISSING_TTL: Duration = Duration::from_millis(500);
/// Lookups remembered at most; past this they are all forgotten.
const LOOKUPS_KEPT: usize = 4096;
/// Lookups asked around at once: more find nothing (404) until one ends, so a flood of random
/// hosts while the store is down costs at most this many times the replicas in peer streams.
const MAX_LOOKUPS: usize = 16;

/// What other replicas answered a lookup for one pool, and when.
type Answers = (Instant, Vec<(ReplicaId, RouteEntry)>);

/// This replica's members first-hand, other replicas' through the store's copy and the peer link.
pub(crate) struct ClusterDirectory {
    local: Arc<dyn Directory>,
    lookup: Lookup,
    me: ReplicaId,
    peers: Arc<PeerClient>,
    spread: Spread,
    /// Bounds a lookup asked around (twice the peer connect timeout).
    lookup_timeout: Duration,
    looked_up: Mutex<HashMap<TunnelKey, Answers>>,
    lookups: Arc<Semaphore>,
    /// The address visitors reached (the public port), for the peer header.
    destination: SocketAddr,
    turn: AtomicU64,
    ids: AtomicU64,
    /// One stable handle per (replica, pool), so kept-alive streams are pooled by it.
    remotes: Mutex<HashMap<(ReplicaId, TunnelKey), Arc<RemoteMembers>>>,
    health: Mutex<Health>,
    /// Other replicas' answers to `list` while the store is down, for the lists.
    listed: Arc<Listed>,
}

/// Which peers cannot be reached, and the replica names `edgemux_cluster_peer_up` reports.
#[derive(Default)]
struct Health {
    ejections: Ejections,
    reported: HashSet<String>,
}

impl ClusterDirectory {
    pub(crate) fn new(
        local: Arc<dyn Directory>,
        (lookup, me): (Lookup, ReplicaId),
        (peers, connect_timeout): (Arc<PeerClient>, Duration),
        (spread, listed): (Spread, Arc<Listed>),
        public_port: u16,
    ) -> Self {
        Self {
            local,
            lookup,
            me,
            peers,
            spread,
            lookup_timeout: connect_timeout * 2,
            looked_up: Mutex::new(HashMap::new()),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), public_port),
            turn: AtomicU64::new(0),
            ids: AtomicU64::new(0),
            remotes: Mutex::new(HashMap::new()),
            health: Mutex::default(),
            listed,
        }
    }

    /// Where replica `rid` listens and whether it serves: its record in the copy, or (while the
    /// store is down) the address where it answered a list.
    fn reach(&self, rid: &ReplicaId) -> Option<(SocketAddr, ReplicaState)> {
        match self.lookup.replica(rid) {
            Some(r) => Some((r.peer_addr, r.state)),
            None => self.listed.address(rid).map(|at| (at, ReplicaState::Serving)),
        }
    }

    /// The copy's address of replica `rid`.
    fn copy_addr(&self) -> impl Fn(&ReplicaId) -> Option<SocketAddr> + '_ {
        |rid| self.lookup.replica(rid).map(|r| r.peer_addr)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a dial of `rid` showed; an ejection or a recovery is counted and reported.
    fn record(&self, rid: &ReplicaId, outcome: Outcome) {
        let change = self
            .health()
            .ejections
            .record(rid.as_str(), outcome, Instant::now());
        match change {
            Change::None => return,
            Change::Ejected(backoff) => {
                tracing::warn!(replica = %rid, ?backoff, "peer unreachable; its members come last until the backoff is over");
                crate::metrics::cluster_peer_ejection(rid.replica_name());
                // Streams kept alive into it may be stalled as well: none is reused, and new
                // handles (new streams) are made once it answers again.
                let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
                remotes.retain(|(r, _), handle| {
                    if r == rid {
                        handle.retire();
                    }
                    r != rid
                });
            }
            Change::Recovered => tracing::info!(replica = %rid, "peer reachable again"),
        }
        self.report_peers();
    }

    /// Sets `edgemux_cluster_peer_up` for every other replica in the directory (a name is up
    /// when one of its incarnations is), and to 0 for names that left it; forgets the records
    /// of replicas that left. Labels are replica names: bounded by the fleet.
    pub(crate) fn report_peers(&self) {
        let replicas = self.lookup.replicas();
        let mut health = self.health();
        health
            .ejections
            .retain(|rid| replicas.iter().any(|(r, _)| r.as_str() == rid));
        let mut up: HashMap<String, bool> = HashMap::new();
        for (rid, _) in replicas.iter().filter(|(rid, _)| *rid != self.me) {
            let this = health.ejections.is_up(rid.as_str());
            *up.entry(rid.replica_name().to_owned()).or_default() |= this;
        }
        for name in health.reported.iter().filter(|n| !up.contains_key(*n)) {
            crate::metrics::cluster_peer_up(name, false);
        }
        for (name, &is_up) in &up {
            crate::metrics::cluster_peer_up(name, is_up);
        }
        health.reported.extend(up.into_keys());
    }

    /// The stable handle of `rid`'s members of `key`.
    fn remote(&self, rid: &ReplicaId, key: &TunnelKey, entry: &RouteEntry) -> Arc<RemoteMembers> {
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        if remotes.len() >= SWEEP_AT {
            // Forget the pools that no replica serves any more (bounded by live routes).
            let lookup = &self.lookup;
            remotes.retain(|(rid, key), _| lookup.routes(&key.host).iter().any(|(r, _)| r == rid));
        }
        let handle = remotes.entry((rid.clone(), key.clone())).or_insert_with(|| {
            Arc::new(RemoteMembers {
                id: REMOTE_ID_BIT | self.ids.fetch_add(1, Ordering::Relaxed),
                replica: rid.to_string(),
                key: entry.key,
                host: key.host.clone(),
                route: key.route,
                upstream: entry.upstream,
                retired: AtomicBool::new(false),
            })
        });
        if handle.key != entry.key || handle.upstream != entry.upstream {
            // The host changed hands on that replica, or its app is spoken to otherwise now: a
            // new handle, so nothing kept alive for the old one is reused.
            *handle = Arc::new(RemoteMembers {
                id: REMOTE_ID_BIT | self.ids.fetch_add(1, Ordering::Relaxed),
                replica: rid.to_string(),
                key: entry.key,
                host: key.host.clone(),
                route: key.route,
                upstream: entry.upstream,
                retired: AtomicBool::new(false),
            });
        }
        handle.clone()
    }

    /// Retires the handles of replicas that drain, left, or no longer serve their pool (see
    /// `RemoteMembers::retired`): run on every change of the store's copy.
    pub(crate) fn retire_stale(&self) {
        let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
        remotes.retain(|(rid, key), handle| {
            let serving = self
                .lookup
                .replica(rid)
                .is_some_and(|r| r.state == ReplicaState::Serving);
            let holds = self
                .lookup
                .routes(&key.host)
                .iter()
                .any(|(r, entry)| r == rid && members_for(entry, key.route) > 0);
            if !(serving && holds) {
                handle.retire();
            }
            serving && holds
        });
    }
}

/// What a dial showed about the peer: a status (OK or a refusal) is an answer; a failure of TCP,
/// TLS or the connection before the status is a failure to reach it; the rest (our own bad
/// request, a tunnel client slow to open its channel, a malformed answer) says nothing.
fn outcome<T>(opened: &Result<T, PeerError>) -> Outcome {
    match opened {
        Ok(_) => Outcome::Answered,
        Err(PeerError::Connect(_) | PeerError::Tls(_) | PeerError::Io(_) | PeerError::Timeout("connect")) => {
            Outcome::Unreachable
        }
        Err(
            PeerError::NoRoute(_)
            | PeerError::OpenFailed(_)
            | PeerError::Busy(_)
            | PeerError::Draining(_)
            | PeerError::Auth(_)
            | PeerError::BadRequest(_),
        ) => Outcome::Answered,
        Err(
            PeerError::Request(_) | PeerError::WrongPeer(_) | PeerError::Timeout(_) | PeerError::Protocol(_),
        ) => Outcome::Unknown,
    }
}

/// Members of `route` in a replica's entry.
fn members_for(entry: &RouteEntry, route: Route) -> u32 {
    match route {
        Route::Http => entry.http,
        Route::Tcp(port) => entry.tcp.get(&port).copied().unwrap_or(0),
    }
}

impl ClusterDirectory {
    /// `local` (this replica's members of `key`) and the members `routes` say other replicas
    /// hold, in the order to try.
    fn spread(&self, key: &TunnelKey, local: Vec<Reach>, routes: Vec<(ReplicaId, RouteEntry)>) -> Vec<Reach> {
        let mut remote = HashMap::new();
        let mut candidates = vec![Candidate {
            target: Target::Local,
            members: u32::try_from(local.len()).unwrap_or(u32::MAX),
            last: false,
        }];
        for (rid, entry) in routes {
            let members = members_for(&entry, key.route);
            if rid == self.me || members == 0 {
                continue;
            }
            // A replica whose record is not (yet) known has no address to dial.
            let Some((_, state)) = self.reach(&rid) else {
                continue;
            };
            let ejected = self.health().ejections.is_ejected(rid.as_str(), Instant::now());
            candidates.push(Candidate {
                target: Target::Remote(rid.to_string()),
                members,
                last: state == ReplicaState::Draining || ejected,
            });
            remote.insert(rid.to_string(), self.remote(&rid, key, &entry));
        }
        if remote.is_empty() {
            return local;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(local.len() + remote.len());
        for target in select::order(&candidates, turn, self.spread) {
            match target {
                Target::Local => out.extend(local.iter().cloned()),
                Target::Remote(rid) => out.extend(remote.remove(&rid).map(Reach::Remote)),
            }
        }
        out
    }

    /// Asks every other replica in the copy whether it holds `key` (op `lookup`), all at once and
    /// within `lookup_timeout`; answers are kept [`LOOKUP_TTL`] ([`MISSING_TTL`] when none holds it). For when the store does not
    /// answer, so a tunnel registered meanwhile is not in the copy.
    async fn ask_around(&self, key: &TunnelKey) -> Vec<(ReplicaId, RouteEntry)> {
        if let Some((at, found)) = self.looked_up.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            let ttl = if found.is_empty() { MISSING_TTL } else { LOOKUP_TTL };
            if at.elapsed() < ttl {
                return found.clone();
            }
        }
        let Ok(_turn) = self.lookups.clone().try_acquire_owned() else {
            tracing::info!(host = %key.host, "too many lookups in flight; not asking the other replicas");
            return Vec::new();
        };
        let port = match key.route {
            Route::Http => 0,
            Route::Tcp(port) => u16::try_from(port).unwrap_or(0),
        };
        let mut asks = tokio::task::JoinSet::new();
        for (rid, record) in self.lookup.replicas() {
            let Ok(req) = PeerRequest::dial(Op::Lookup, &key.host, port, self.destination, self.destination)
            else {
                return Vec::new();
            };
            let peers = self.peers.clone();
            asks.spawn(async move {
                let answer = peers.command(record.peer_addr, rid.as_str(), req).await;
                (rid, answer)
            });
        }
        let mut found = Vec::new();
        let collect = async {
            while let Some(done) = asks.join_next().await {
                let Ok((rid, Ok(json))) = done else { continue };
                match self.lookup.decode_route(&key.host, json.as_bytes()) {
                    Ok(entry) => found.push((rid, entry)),
                    Err(e) => {
                        tracing::info!(replica = %rid, host = %key.host, error = %e, "a lookup answer was refused")
                    }
                }
            }
        };
        let _ = tokio::time::timeout(self.lookup_timeout, collect).await;
        tracing::info!(host = %key.host, holders = found.len(), "the cluster store does not answer; asked the other replicas");
        let mut kept = self.looked_up.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= LOOKUPS_KEPT {
            kept.clear();
        }
        kept.insert(key.clone(), (Instant::now(), found.clone()));
        found
    }
}

impl Directory for ClusterDirectory {
    fn members(&self, key: &TunnelKey) -> Vec<Reach> {
        let local = self.local.members(key);
        let routes = self
            .listed
            .routes(&key.host, self.lookup.routes(&key.host), self.copy_addr());
        self.spread(key, local, routes)
    }

    fn find<'a>(&'a self, key: &'a TunnelKey) -> Finding<'a> {
        Box::pin(async move {
            let found = self.members(key);
            if !found.is_empty() || self.lookup.store_up() {
                return found;
            }
            let answers = self.ask_around(key).await;
            self.spread(key, Vec::new(), answers)
        })
    }

    fn open<'a>(&'a self, member: &'a Reach, visitor: Visitor<'a>) -> Opening<'a> {
        let Reach::Remote(r) = member else {
            return self.local.open(member, visitor);
        };
        Box::pin(async move {
            let rid = ReplicaId::parse(&r.replica)?;
            let (peer_addr, _) = self.reach(&rid)?;
            // The op says what the stream carries, so the owner opens only members that speak it.
            let (op, port) = match (r.route, r.upstream) {
                (Route::Http, Upstream::Http1) => (Op::DialHttp, 0),
                (Route::Http, Upstream::H2c) => (Op::DialH2c, 0),
                (Route::Http, Upstream::Passthrough) => (Op::DialTls, 0),
                (Route::Tcp(port), _) => (Op::DialTcp, u16::try_from(port).ok()?),
            };
            let (addr, port_from) = visitor.origin;
            let ip = addr.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let source = SocketAddr::new(ip, u16::try_from(port_from).unwrap_or(0));
            let mut req = PeerRequest::dial(op, &r.host, port, source, self.destination).ok()?;
            // An endpoint id the codec refuses is left out rather than failing the visitor.
            if let Some(vpce) = visitor.vpce {
                req = req.clone().with_vpce(vpce).unwrap_or(req);
            }
            if let Some(key) = visitor.key {
                req = req.on_behalf_of(key);
            }
            let opened = self.peers.open(peer_addr, rid.as_str(), req).await;
            self.record(&rid, outcome(&opened));
            match opened {
                Ok(stream) => Some(Opened { stream, slot: None }),
                Err(e) => {
                    tracing::info!(replica = %rid, host = %r.host, error = %e, "peer stream not opened; trying the next member");
                    None
                }
            }
        })
    }

    fn passthrough_members(&self, key: &TunnelKey) -> Vec<Reach> {
        let routes = self
            .listed
            .routes(&key.host, self.lookup.routes(&key.host), self.copy_addr());
        let routes: Vec<_> = routes
            .into_iter()
            .filter(|(rid, entry)| *rid != self.me && entry.upstream == Upstream::Passthrough)
            .collect();
        if routes.is_empty() {
            return Vec::new();
        }
        self.spread(key, Vec::new(), routes)
    }

    fn remote_tunnels(&self) -> Vec<RemoteTunnel> {
        let routes = self.listed.merge(self.lookup.snapshot().routes, self.copy_addr());
        let mut out = Vec::new();
        for (host, rid, entry) in routes {
            if rid == self.me {
                continue;
            }
            let mut push = |route, members| {
                out.push(RemoteTunnel {
                    key: TunnelKey {
                        host: host.clone(),
                        route,
                    },
                    owner: entry.key,
                    replica: rid.replica_name().to_owned(),
                    members,
                });
            };
            if entry.http > 0 {
                push(Route::Http, entry.http);
            }
            for (&port, &n) in &entry.tcp {
                push(Route::Tcp(port), n);
            }
        }
        out
    }

    fn replica_name(&self) -> Option<&str> {
        Some(self.me.replica_name())
    }

    fn freshness(&self) -> Option<&'static str> {
        Some(if self.lookup.store_up() { "ok" } else { "stale" })
    }
}
