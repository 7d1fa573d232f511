//! Tunnel lists while the store is down (SCALEOUT §6): every [`LIST_EVERY`] each other replica
//! in the copy is asked (op `list`) for every route it holds, and `ssh gw tunnels` and
//! `/tunnels` show its answer in place of the copy's entries for it. Tunnels opened or closed
//! on another replica during the outage are then listed right. While the store serves this
//! replica nothing is asked and the copy rules.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

#[cfg(feature = "etcd")]
use super::peer::link::client::{PeerClient, PeerError};
use super::store::{EntryError, ReplicaId, RouteEntry};

/// How often the peers are asked while the store is down: a tunnel opened elsewhere is listed
/// within about this long.
pub(crate) const LIST_EVERY: Duration = Duration::from_secs(2);
/// Replicas asked per round, as for lookups and pings.
const MAX_ASKED: usize = 16;
/// A list names a host, as every peer request does; nobody serves this one.
const LIST_HOST: &str = "list.edgemux.invalid";

/// One route of another replica: host, replica, entry.
pub(crate) type Listing = (String, ReplicaId, RouteEntry);

/// The last answer of each replica that answered a list, while the store is down.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    answers: Mutex<HashMap<ReplicaId, Vec<(String, RouteEntry)>>>,
}

impl Listed {
    fn answers(&self) -> MutexGuard<'_, HashMap<ReplicaId, Vec<(String, RouteEntry)>>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The routes to show: the copy's, except that a replica which answered a list is shown as
    /// it answered.
    pub(crate) fn merge(&self, copy: Vec<Listing>) -> Vec<Listing> {
        let answers = self.answers();
        if answers.is_empty() {
            return copy;
        }
        let mut out: Vec<Listing> = copy
            .into_iter()
            .filter(|(_, rid, _)| !answers.contains_key(rid))
            .collect();
        for (rid, routes) in answers.iter() {
            out.extend(
                routes
                    .iter()
                    .map(|(host, e)| (host.clone(), rid.clone(), e.clone())),
            );
        }
        out
    }

    /// Until `stop`: while the store does not serve this replica, asks the other replicas in
    /// the copy for their routes every [`LIST_EVERY`]; forgets every answer once it does.
    #[cfg(feature = "etcd")]
    pub(crate) async fn poll(
        self: std::sync::Arc<Self>,
        lookup: super::store::Lookup,
        (client, destination): (std::sync::Arc<PeerClient>, std::net::SocketAddr),
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
                self.answers().clear();
                continue;
            }
            let mut asks = tokio::task::JoinSet::new();
            for (rid, record) in lookup.replicas().into_iter().take(MAX_ASKED) {
                let client = client.clone();
                let req = PeerRequest::dial(Op::List, LIST_HOST, 0, destination, destination);
                asks.spawn(async move {
                    let body = match req {
                        Ok(req) => client.fetch(record.peer_addr, rid.as_str(), req, MAX_LIST).await,
                        Err(e) => Err(PeerError::Request(e)),
                    };
                    (rid, body)
                });
            }
            while let Some(Ok((rid, body))) = asks.join_next().await {
                match body {
                    Ok(body) => {
                        let (routes, dropped) = parse(&body, |h, v| lookup.decode_route(h, v));
                        if dropped > 0 {
                            tracing::info!(replica = %rid, dropped, "list lines refused");
                        }
                        self.answers().insert(rid, routes);
                    }
                    Err(e) => {
                        // Its entries in the copy are the best left.
                        tracing::debug!(replica = %rid, error = %e, "list not answered");
                        self.answers().remove(&rid);
                    }
                }
            }
            self.answers().retain(|rid, _| lookup.replica(rid).is_some());
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
        }
    }

    fn host(name: &str) -> String {
        format!("{name}-{}.gw.test", entry(1).key.key_id())
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
    fn a_replica_that_answered_is_shown_as_it_answered() {
        let (r1, r2) = (ReplicaId::new("r1", 1), ReplicaId::new("r2", 2));
        let copy = vec![
            (host("old"), r1.clone(), entry(1)),
            (host("kept"), r2.clone(), entry(1)),
        ];
        let listed = Listed::default();
        assert_eq!(listed.merge(copy.clone()), copy, "no answers: the copy");
        listed.answers().insert(r1.clone(), vec![(host("new"), entry(3))]);
        let mut merged = listed.merge(copy);
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            merged,
            vec![(host("kept"), r2, entry(1)), (host("new"), r1, entry(3))]
        );
    }
}
