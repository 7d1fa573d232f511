//! Other replicas as they say they are, while the store is down (SCALEOUT §3.5, §6): every
//! [`LIST_EVERY`] each peer address this replica knows (the copy's records, and those it
//! remembered from its last run) is asked for every route it holds (op `list`), taking whichever
//! replica of the cluster answers there. Its answer replaces the copy's entries for that replica,
//! and for any earlier id at that address, in the lists and in routing. So tunnels opened or
//! closed during the outage are listed and served right, a replica restarted meanwhile under a
//! new id is found at its old address, and one restarted with an empty copy finds the others.
//! While the store serves this replica nothing is asked and the copy rules.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

#[cfg(feature = "store")]
use super::peer::link::client::{PeerClient, PeerError};
use super::store::{EntryError, ReplicaId, RouteEntry};

/// How often the peers are asked while the store is down: a tunnel opened elsewhere is listed
/// and served within about this long.
pub(crate) const LIST_EVERY: Duration = Duration::from_secs(2);
/// Addresses asked per round, as many as lookups and pings.
const MAX_ASKED: usize = 16;
/// A list names a host, as every peer request does; nobody serves this one.
#[cfg(feature = "store")]
const LIST_HOST: &str = "list.edgemux.invalid";
/// The remembered peer addresses: a few bytes each, bounded on read.
const MAX_SEEDS: usize = 64;

/// One route of another replica: host, replica, entry.
pub(crate) type Listing = (String, ReplicaId, RouteEntry);

/// What the replica at one address answered.
#[derive(Debug)]
struct Answer {
    rid: ReplicaId,
    routes: HashMap<String, RouteEntry>,
}

/// The last answer at each address that answered a list, while the store is down.
#[derive(Debug)]
pub(crate) struct Listed {
    /// This replica's own peer address: never asked.
    me: SocketAddr,
    /// Peer addresses remembered from the last run, for a start with the store down.
    seeds: Vec<SocketAddr>,
    answers: Mutex<HashMap<SocketAddr, Answer>>,
    /// Whether `answers` holds any: routing reads this on every request, and while the store
    /// serves this replica (nearly always) it is false and no lock is taken.
    any: AtomicBool,
}

impl Listed {
    pub(crate) fn new(me: SocketAddr, seeds: Vec<SocketAddr>) -> Self {
        Self {
            me,
            seeds,
            answers: Mutex::default(),
            any: AtomicBool::new(false),
        }
    }

    fn answers(&self) -> MutexGuard<'_, HashMap<SocketAddr, Answer>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a copy entry of `rid` gives way to an answer: that replica answered, or another
    /// one answered at its address (it was restarted).
    fn superseded(
        answers: &HashMap<SocketAddr, Answer>,
        rid: &ReplicaId,
        addr_of: &impl Fn(&ReplicaId) -> Option<SocketAddr>,
    ) -> bool {
        answers.values().any(|a| a.rid == *rid) || addr_of(rid).is_some_and(|at| answers.contains_key(&at))
    }

    /// Every route to show: the copy's (`addr_of` gives a replica's address in it), except that
    /// an address which answered is shown as it answered.
    pub(crate) fn merge(
        &self,
        copy: Vec<Listing>,
        addr_of: impl Fn(&ReplicaId) -> Option<SocketAddr>,
    ) -> Vec<Listing> {
        if !self.any.load(Ordering::Acquire) {
            return copy;
        }
        let answers = self.answers();
        if answers.is_empty() {
            return copy;
        }
        let mut out: Vec<Listing> = copy
            .into_iter()
            .filter(|(_, rid, _)| !Self::superseded(&answers, rid, &addr_of))
            .collect();
        for a in answers.values() {
            out.extend(
                a.routes
                    .iter()
                    .map(|(h, e)| (h.clone(), a.rid.clone(), e.clone())),
            );
        }
        out
    }

    /// The routes of one host, as [`Self::merge`] has them.
    pub(crate) fn routes(
        &self,
        host: &str,
        copy: Vec<(ReplicaId, RouteEntry)>,
        addr_of: impl Fn(&ReplicaId) -> Option<SocketAddr>,
    ) -> Vec<(ReplicaId, RouteEntry)> {
        if !self.any.load(Ordering::Acquire) {
            return copy;
        }
        let answers = self.answers();
        if answers.is_empty() {
            return copy;
        }
        let mut out: Vec<_> = copy
            .into_iter()
            .filter(|(rid, _)| !Self::superseded(&answers, rid, &addr_of))
            .collect();
        for a in answers.values() {
            out.extend(a.routes.get(host).map(|e| (a.rid.clone(), e.clone())));
        }
        out
    }

    /// The address of a replica known only from its answer (not in the copy).
    pub(crate) fn address(&self, rid: &ReplicaId) -> Option<SocketAddr> {
        let answers = self.answers();
        answers.iter().find(|(_, a)| a.rid == *rid).map(|(at, _)| *at)
    }

    /// The addresses to ask: the copy's, those that answered, the remembered ones; not ours.
    fn targets(&self, copy: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
        let answered: Vec<SocketAddr> = self.answers().keys().copied().collect();
        let mut out: Vec<SocketAddr> = Vec::new();
        for at in copy.into_iter().chain(answered).chain(self.seeds.iter().copied()) {
            if at != self.me && !out.contains(&at) && out.len() < MAX_ASKED {
                out.push(at);
            }
        }
        out
    }

    fn take(&self, at: SocketAddr, answer: Option<Answer>) {
        let mut answers = self.answers();
        match answer {
            Some(answer) => {
                answers.insert(at, answer);
            }
            // Its entries in the copy are the best left.
            None => {
                answers.remove(&at);
            }
        }
        self.any.store(!answers.is_empty(), Ordering::Release);
    }

    /// Forgets every answer: the store serves this replica again.
    fn forget(&self) {
        let mut answers = self.answers();
        answers.clear();
        self.any.store(false, Ordering::Release);
    }

    /// Until `stop`: while the store does not serve this replica, asks every address in
    /// [`Self::targets`] for its routes every [`LIST_EVERY`]; forgets every answer once it does.
    #[cfg(feature = "store")]
    pub(crate) async fn poll(
        self: std::sync::Arc<Self>,
        lookup: super::store::Lookup,
        (client, destination): (std::sync::Arc<PeerClient>, SocketAddr),
        stop: tokio_util::sync::CancellationToken,
    ) {
        use super::peer::codec::{Op, PeerRequest};
        use super::peer::link::server::MAX_LIST;
        let mut ticks = tokio::time::interval(LIST_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if lookup.store_up() {
                self.forget();
                continue;
            }
            let copy = lookup.replicas().into_iter().map(|(_, r)| r.peer_addr);
            let mut asks = tokio::task::JoinSet::new();
            for at in self.targets(copy) {
                let client = client.clone();
                let req = PeerRequest::dial(Op::List, LIST_HOST, 0, destination, destination);
                asks.spawn(async move {
                    let answer = match req {
                        Ok(req) => client.fetch_any(at, req, MAX_LIST).await,
                        Err(e) => Err(PeerError::Request(e)),
                    };
                    (at, answer)
                });
            }
            while let Some(Ok((at, answer))) = asks.join_next().await {
                let answer = answer.map_err(|e| e.to_string()).and_then(|(rid, body)| {
                    let rid = ReplicaId::parse(&rid).ok_or_else(|| format!("bad replica id {rid:?}"))?;
                    let (routes, dropped) = parse(&body, |h, v| lookup.decode_route(h, v));
                    if dropped > 0 {
                        tracing::info!(replica = %rid, dropped, "list lines refused");
                    }
                    Ok(Answer {
                        rid,
                        routes: routes.into_iter().collect(),
                    })
                });
                match answer {
                    Ok(answer) => self.take(at, Some(answer)),
                    Err(error) => {
                        tracing::debug!(peer = %at, error, "list not answered");
                        self.take(at, None);
                    }
                }
            }
        }
    }
}

/// A list answer: `host SP route-JSON` lines, each checked as an entry read from the store
/// (`decode`). Returns the routes taken and how many lines were not.
pub(crate) fn parse(
    body: &[u8],
    decode: impl Fn(&str, &[u8]) -> Result<RouteEntry, EntryError>,
) -> (Vec<(String, RouteEntry)>, usize) {
    let mut routes = Vec::new();
    let mut dropped = 0;
    for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let split = line.iter().position(|&b| b == b' ');
        let parsed = split.and_then(|at| {
            let host = std::str::from_utf8(&line[..at]).ok()?;
            let entry = decode(host, &line[at + 1..]).ok()?;
            Some((host.to_owned(), entry))
        });
        match parsed {
            Some(route) => routes.push(route),
            None => dropped += 1,
        }
    }
    (routes, dropped)
}

/// The peer addresses remembered in `path` (one per line); none when it is missing or unread.
pub(crate) fn load_seeds(path: &Path) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.trim().parse().ok())
        .take(MAX_SEEDS)
        .collect()
}

/// Remembers `addrs` in `path` (write, then rename), for a start with the store down.
pub(crate) fn save_seeds(path: &Path, addrs: &[SocketAddr]) -> std::io::Result<()> {
    let text: String = addrs.iter().take(MAX_SEEDS).map(|a| format!("{a}\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cluster::store::{decode_route, encode_route};
    use crate::names::KeyFingerprint;

    fn entry(http: u32) -> RouteEntry {
        RouteEntry {
            key: KeyFingerprint::from_sha256([7; 32]),
            http,
            tcp: Default::default(),
            since: 1,
            upstream: Default::default(),
        }
    }

    fn host(name: &str) -> String {
        format!("{name}-{}.gw.test", entry(1).key.key_id())
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn lines_are_checked_as_store_entries() {
        let json = String::from_utf8(encode_route(&entry(2)).unwrap()).unwrap();
        let body = format!(
            "{a} {json}\nnot-a-line\n{other} {json}\n{b} {{\"bad\":1}}\n\n{c} {json}",
            a = host("a"),
            other = "x-00000000.gw.test",
            b = host("b"),
            c = host("c"),
        );
        let none = |_: &str, _: &KeyFingerprint| false;
        let (routes, dropped) = parse(body.as_bytes(), |h, v| decode_route(h, v, &none));
        let hosts: Vec<&str> = routes.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, [host("a"), host("c")]);
        assert_eq!(routes[0].1, entry(2));
        assert_eq!(dropped, 3, "no space, another key's host, a bad value");
    }

    #[test]
    fn an_address_that_answered_is_shown_as_it_answered_under_its_new_id() {
        let (r1, r2, r3_old, r3) = (
            ReplicaId::new("r1", 1),
            ReplicaId::new("r2", 2),
            ReplicaId::new("r3", 3),
            ReplicaId::new("r3", 4),
        );
        let addr_of = |rid: &ReplicaId| {
            [(&r1, addr(1)), (&r2, addr(2)), (&r3_old, addr(3))]
                .iter()
                .find(|(r, _)| *r == rid)
                .map(|(_, a)| *a)
        };
        let copy = vec![
            (host("old"), r1.clone(), entry(1)),
            (host("kept"), r2.clone(), entry(1)),
            (host("gone"), r3_old.clone(), entry(1)),
        ];
        let listed = Listed::new(addr(9), vec![addr(3), addr(9)]);
        assert_eq!(listed.merge(copy.clone(), addr_of), copy, "no answers: the copy");
        let answer = |rid: &ReplicaId, h: &str, n| Answer {
            rid: rid.clone(),
            routes: HashMap::from([(host(h), entry(n))]),
        };
        listed.take(addr(1), Some(answer(&r1, "new", 3)));
        listed.take(addr(3), Some(answer(&r3, "late", 1)));
        let mut merged = listed.merge(copy.clone(), addr_of);
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            merged,
            vec![
                (host("kept"), r2.clone(), entry(1)),
                (host("late"), r3.clone(), entry(1)),
                (host("new"), r1.clone(), entry(3)),
            ]
        );
        let one = |h: &str| listed.routes(&host(h), vec![], addr_of);
        assert_eq!(one("late"), vec![(r3.clone(), entry(1))]);
        assert_eq!(
            listed.routes(&host("gone"), vec![(r3_old.clone(), entry(1))], addr_of),
            vec![],
            "r3's old id gave way to its new one at its address"
        );
        assert_eq!(listed.address(&r3), Some(addr(3)));
        assert_eq!(listed.address(&r2), None);
        // Ours is never asked; each address once.
        assert_eq!(
            listed.targets([addr(2), addr(1)]),
            vec![addr(2), addr(1), addr(3)]
        );
        listed.take(addr(3), None);
        assert_eq!(listed.address(&r3), None, "no answer: forgotten");
        listed.forget();
        assert_eq!(
            listed.merge(copy.clone(), addr_of),
            copy,
            "the store is back: the copy"
        );
    }

    #[test]
    fn seeds_are_remembered_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster-peers");
        assert!(load_seeds(&path).is_empty());
        save_seeds(&path, &[addr(1), addr(2)]).unwrap();
        assert_eq!(load_seeds(&path), vec![addr(1), addr(2)]);
        let many: String = (0..100).map(|p| format!("{}\njunk\n", addr(p))).collect();
        std::fs::write(&path, many).unwrap();
        assert_eq!(load_seeds(&path).len(), MAX_SEEDS);
    }
}
