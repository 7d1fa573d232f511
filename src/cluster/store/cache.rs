//! The directory as this replica sees it: every replica's record and routes, rebuilt from a full
//! read and kept current by applying the store's events in order. Pure: no I/O, no clock; the
//! etcd shell feeds it and routing reads it.
//!
//! Each entry keeps the revision that wrote it, so an event older than what the cache holds for
//! its key changes nothing. Entries are bounded by a cap: over it a new entry is refused and
//! counted, while updates and deletes of held entries still apply.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::entry::{
    decode_replica, decode_route, EntryError, Key, Keys, ReplicaEntry, ReplicaId, Reserved, RouteEntry,
};

/// The most entries (replica records and routes) one cache holds: 10,000 tunnels on each of 10
/// replicas at ~200 B each is 20 MB. SCALEOUT §11 did not study larger fleets.
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// One event from the store, with the revision that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        revision: i64,
    },
    Delete {
        key: Vec<u8>,
        revision: i64,
    },
}

/// What applying a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    Changed,
    /// Older than what the cache holds for the key, or a delete of nothing.
    Unchanged,
    /// Not taken (and, for a key the cache held, its old entry is gone: the store replaced it).
    Dropped(EntryError),
}

/// Everything the cache holds, sorted: for the admin API and for tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub replicas: Vec<(ReplicaId, ReplicaEntry)>,
    pub routes: Vec<(String, ReplicaId, RouteEntry)>,
}

/// Every replica's record and routes, keyed as the store keys them.
pub(crate) struct Cache {
    keys: Keys,
    me: ReplicaId,
    reserved: Arc<Reserved>,
    max_entries: usize,
    /// Every event up to here has been applied.
    revision: i64,
    replicas: HashMap<ReplicaId, (i64, ReplicaEntry)>,
    routes: HashMap<String, Vec<(ReplicaId, i64, RouteEntry)>>,
    route_count: usize,
    dropped: BTreeMap<&'static str, u64>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("me", &self.me)
            .field("revision", &self.revision)
            .field("replicas", &self.replicas.len())
            .field("routes", &self.route_count)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// An empty cache for replica `me`; `reserved` admits vanity hosts (see [`decode_route`]).
    pub(crate) fn new(keys: Keys, me: ReplicaId, reserved: Arc<Reserved>, max_entries: usize) -> Self {
        Self {
            keys,
            me,
            reserved,
            max_entries,
            revision: 0,
            replicas: HashMap::new(),
            routes: HashMap::new(),
            route_count: 0,
            dropped: BTreeMap::new(),
        }
    }

    /// Reads a route another replica answered for `host` (a lookup over the peer link), with the
    /// checks an entry read from the store passes.
    pub(crate) fn decode_route(&self, host: &str, value: &[u8]) -> Result<RouteEntry, EntryError> {
        decode_route(host, value, self.reserved.as_ref())
    }

    /// An empty cache like this one (same replica, keys, check and cap) that carries on its
    /// drop counts: a resync fills it while this one still answers lookups, then replaces it.
    pub(crate) fn fresh(&self) -> Self {
        let mut fresh = Self::new(
            self.keys.clone(),
            self.me.clone(),
            self.reserved.clone(),
            self.max_entries,
        );
        fresh.dropped = self.dropped.clone();
        fresh
    }

    /// Replaces everything with a full read at `revision` (`(key, value, mod_revision)`), the
    /// start and every resync. Returns the entries dropped.
    pub(crate) fn reset(
        &mut self,
        revision: i64,
        entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>, i64)>,
    ) -> Vec<EntryError> {
        self.replicas.clear();
        self.routes.clear();
        self.route_count = 0;
        self.revision = revision;
        entries
            .into_iter()
            .filter_map(
                |(key, value, revision)| match self.apply(Change::Put { key, value, revision }) {
                    Applied::Dropped(e) => Some(e),
                    _ => None,
                },
            )
            .collect()
    }

    /// Applies one event. A dropped entry is also counted (see [`Self::dropped`]).
    pub(crate) fn apply(&mut self, change: Change) -> Applied {
        let applied = match change {
            Change::Put { key, value, revision } => self.put(&key, &value, revision),
            Change::Delete { key, revision } => self.delete(&key, revision),
        };
        if let Applied::Dropped(e) = applied {
            *self.dropped.entry(e.reason()).or_default() += 1;
        }
        applied
    }

    /// Records that every event up to `revision` has been applied (a progress notice).
    pub(crate) fn advance(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    fn put(&mut self, key: &[u8], value: &[u8], revision: i64) -> Applied {
        self.advance(revision);
        let parsed = match self.keys.parse(key) {
            Ok(k) => k,
            Err(e) => return Applied::Dropped(e),
        };
        let full = self.len() >= self.max_entries;
        match parsed {
            Key::Replica(rid) => {
                if self.replicas.get(&rid).is_some_and(|(r, _)| *r > revision) {
                    return Applied::Unchanged;
                }
                let entry = match decode_replica(value) {
                    Ok(e) => e,
                    Err(e) => return self.drop_replica(&rid, e),
                };
                if full && !self.replicas.contains_key(&rid) {
                    return Applied::Dropped(EntryError::OverCapacity);
                }
                self.replicas.insert(rid, (revision, entry));
                Applied::Changed
            }
            Key::Route { host, rid } => {
                let held = self.route_slot(&host, &rid);
                if held.is_some_and(|(r, _)| r > revision) {
                    return Applied::Unchanged;
                }
                let entry = match decode_route(&host, value, &*self.reserved) {
                    Ok(e) => e,
                    Err(e) => return self.drop_route(&host, &rid, e),
                };
                if full && held.is_none() {
                    return Applied::Dropped(EntryError::OverCapacity);
                }
                self.insert_route(host, rid, revision, entry);
                Applied::Changed
            }
        }
    }

    fn delete(&mut self, key: &[u8], revision: i64) -> Applied {
        self.advance(revision);
        match self.keys.parse(key) {
            Ok(Key::Replica(rid)) => match self.replicas.get(&rid) {
                Some((r, _)) if *r <= revision => {
                    self.replicas.remove(&rid);
                    Applied::Changed
                }
                _ => Applied::Unchanged,
            },
            Ok(Key::Route { host, rid }) => match self.route_slot(&host, &rid) {
                Some((r, _)) if r <= revision => {
                    self.remove_route(&host, &rid);
                    Applied::Changed
                }
                _ => Applied::Unchanged,
            },
            // A key the cache could never have taken: nothing to remove.
            Err(_) => Applied::Unchanged,
        }
    }

    fn drop_replica(&mut self, rid: &ReplicaId, e: EntryError) -> Applied {
        self.replicas.remove(rid);
        Applied::Dropped(e)
    }

    fn drop_route(&mut self, host: &str, rid: &ReplicaId, e: EntryError) -> Applied {
        self.remove_route(host, rid);
        Applied::Dropped(e)
    }

    /// The revision and position of `(host, rid)`, if held.
    fn route_slot(&self, host: &str, rid: &ReplicaId) -> Option<(i64, usize)> {
        let list = self.routes.get(host)?;
        list.iter()
            .position(|(r, _, _)| r == rid)
            .and_then(|i| list.get(i).map(|(_, rev, _)| (*rev, i)))
    }

    fn insert_route(&mut self, host: String, rid: ReplicaId, revision: i64, entry: RouteEntry) {
        let list = self.routes.entry(host).or_default();
        match list.iter_mut().find(|(r, _, _)| *r == rid) {
            Some(slot) => *slot = (rid, revision, entry),
            None => {
                list.push((rid, revision, entry));
                list.sort_by(|a, b| a.0.cmp(&b.0));
                self.route_count += 1;
            }
        }
    }

    fn remove_route(&mut self, host: &str, rid: &ReplicaId) {
        let Some(list) = self.routes.get_mut(host) else {
            return;
        };
        let before = list.len();
        list.retain(|(r, _, _)| r != rid);
        self.route_count -= before - list.len();
        if list.is_empty() {
            self.routes.remove(host);
        }
    }

    /// The other replicas serving `host`, by replica id. A route whose replica has no record
    /// (not written yet, or already gone) is left out: there is no address to reach it at.
    pub(crate) fn routes(&self, host: &str) -> Vec<(ReplicaId, RouteEntry)> {
        self.routes
            .get(host)
            .into_iter()
            .flatten()
            .filter(|(rid, _, _)| *rid != self.me && self.replicas.contains_key(rid))
            .map(|(rid, _, entry)| (rid.clone(), entry.clone()))
            .collect()
    }

    /// The hosts `rid` has routes for (this replica's own, to find what it must delete).
    pub(crate) fn hosts_of(&self, rid: &ReplicaId) -> Vec<String> {
        self.routes
            .iter()
            .filter(|(_, list)| list.iter().any(|(r, _, _)| r == rid))
            .map(|(host, _)| host.clone())
            .collect()
    }

    /// Every replica held, by its record or by a route, this one included: whose liveness a
    /// store without expiry events (Redis) must check.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn rids(&self) -> BTreeSet<ReplicaId> {
        let mut all: BTreeSet<ReplicaId> = self.replicas.keys().cloned().collect();
        all.extend(self.routes.values().flatten().map(|(rid, _, _)| rid.clone()));
        all
    }

    /// One replica's record (this one's too).
    pub(crate) fn replica(&self, rid: &ReplicaId) -> Option<ReplicaEntry> {
        self.replicas.get(rid).map(|(_, e)| e.clone())
    }

    /// The other replicas, by id.
    pub(crate) fn replicas(&self) -> Vec<(ReplicaId, ReplicaEntry)> {
        let mut all: Vec<_> = self
            .replicas
            .iter()
            .filter(|(rid, _)| **rid != self.me)
            .map(|(rid, (_, e))| (rid.clone(), e.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Everything held, this replica's entries included.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut replicas: Vec<_> = self
            .replicas
            .iter()
            .map(|(rid, (_, e))| (rid.clone(), e.clone()))
            .collect();
        replicas.sort_by(|a, b| a.0.cmp(&b.0));
        let mut routes: Vec<_> = self
            .routes
            .iter()
            .flat_map(|(host, list)| {
                list.iter()
                    .map(move |(rid, _, e)| (host.clone(), rid.clone(), e.clone()))
            })
            .collect();
        routes.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Snapshot {
            revision: self.revision,
            replicas,
            routes,
        }
    }

    /// Entries held: replica records and routes.
    pub(crate) fn len(&self) -> usize {
        self.replicas.len() + self.route_count
    }

    // Only etcd's watcher resumes from a revision.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// Entries dropped so far for `reason` (an [`EntryError::reason`]), resyncs included.
    pub(crate) fn dropped(&self, reason: &str) -> u64 {
        self.dropped.get(reason).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::entry::{encode_replica, encode_route, ReplicaState};
    use super::*;
    use crate::names::KeyFingerprint;

    const FP: KeyFingerprint = KeyFingerprint::from_sha256([9u8; 32]);

    fn keys() -> Keys {
        Keys::new("prod")
    }

    fn rid(n: u32) -> ReplicaId {
        ReplicaId::new("r", n)
    }

    fn cache(max: usize) -> Cache {
        let reserved: Arc<Reserved> = Arc::new(|h: &str, _: &KeyFingerprint| h == "vanity.test");
        Cache::new(keys(), rid(0), reserved, max)
    }

    fn host(name: &str) -> String {
        format!("{name}-{}.gw.test", FP.key_id())
    }

    fn route_value(http: u32) -> Vec<u8> {
        encode_route(&RouteEntry {
            key: FP,
            http,
            tcp: BTreeMap::new(),
            since: 7,
            upstream: Default::default(),
        })
        .unwrap()
    }

    fn replica_value(state: ReplicaState) -> Vec<u8> {
        encode_replica(&ReplicaEntry {
            peer_addr: "10.0.0.1:7443".parse().unwrap(),
            version: "1".into(),
            state,
            started: 1,
            config_hash: String::new(),
        })
        .unwrap()
    }

    fn put_route(host: &str, r: u32, http: u32, revision: i64) -> Change {
        Change::Put {
            key: keys().route(host, &rid(r)).into_bytes(),
            value: route_value(http),
            revision,
        }
    }

    fn del_route(host: &str, r: u32, revision: i64) -> Change {
        Change::Delete {
            key: keys().route(host, &rid(r)).into_bytes(),
            revision,
        }
    }

    fn put_replica(r: u32, revision: i64) -> Change {
        Change::Put {
            key: keys().replica(&rid(r)).into_bytes(),
            value: replica_value(ReplicaState::Serving),
            revision,
        }
    }

    fn members(c: &Cache, host: &str) -> Vec<(u32, u32)> {
        c.routes(host)
            .into_iter()
            .map(|(r, e)| (u32::from_str_radix(&r.as_str()[2..], 16).unwrap(), e.http))
            .collect()
    }

    #[test]
    fn events_in_order_build_the_directory() {
        let mut c = cache(MAX_ENTRIES);
        let h = host("app");
        assert_eq!(c.apply(put_replica(1, 2)), Applied::Changed);
        assert_eq!(c.apply(put_route(&h, 1, 1, 3)), Applied::Changed);
        assert_eq!(c.apply(put_replica(2, 4)), Applied::Changed);
        assert_eq!(c.apply(put_route(&h, 2, 2, 5)), Applied::Changed);
        assert_eq!(members(&c, &h), [(1, 1), (2, 2)]);
        assert_eq!(c.apply(put_route(&h, 1, 3, 6)), Applied::Changed);
        assert_eq!(members(&c, &h), [(1, 3), (2, 2)]);
        assert_eq!(c.apply(del_route(&h, 1, 7)), Applied::Changed);
        assert_eq!(members(&c, &h), [(2, 2)]);
        assert_eq!(c.revision(), 7);
        assert_eq!(c.len(), 3);
        assert_eq!(c.replicas().len(), 2);
    }

    #[test]
    fn this_replica_and_replicas_without_a_record_are_not_routes() {
        let mut c = cache(MAX_ENTRIES);
        let h = host("app");
        c.apply(put_replica(0, 1));
        c.apply(put_route(&h, 0, 1, 2));
        c.apply(put_route(&h, 3, 1, 3));
        assert!(c.routes(&h).is_empty(), "own and record-less routes");
        assert!(c.replicas().is_empty(), "the others only");
        assert!(c.replica(&rid(0)).is_some(), "own record by id");
        assert_eq!(c.snapshot().routes.len(), 2, "the snapshot has everything");
        c.apply(put_replica(3, 4));
        assert_eq!(members(&c, &h), [(3, 1)]);
        c.apply(Change::Delete {
            key: keys().replica(&rid(3)).into_bytes(),
            revision: 5,
        });
        assert!(
            c.routes(&h).is_empty(),
            "a replica gone takes its routes out of lookups"
        );
    }

    #[test]
    fn stale_events_change_nothing() {
        let mut c = cache(MAX_ENTRIES);
        let h = host("app");
        c.apply(put_replica(1, 1));
        c.apply(put_route(&h, 1, 2, 10));
        assert_eq!(c.apply(put_route(&h, 1, 5, 9)), Applied::Unchanged);
        assert_eq!(c.apply(del_route(&h, 1, 9)), Applied::Unchanged);
        assert_eq!(members(&c, &h), [(1, 2)]);
        assert_eq!(c.apply(del_route(&h, 1, 11)), Applied::Changed);
        assert_eq!(
            c.apply(del_route(&h, 1, 12)),
            Applied::Unchanged,
            "tombstone of nothing"
        );
        assert_eq!(c.len(), 1, "the replica record is left");
    }

    #[test]
    fn invalid_entries_are_dropped_counted_and_replace_the_old_value() {
        let mut c = cache(MAX_ENTRIES);
        let h = host("app");
        c.apply(put_replica(1, 1));
        c.apply(put_route(&h, 1, 2, 2));
        let foreign = Change::Put {
            key: keys().route("app-aaaaaaaa.gw.test", &rid(1)).into_bytes(),
            value: route_value(1),
            revision: 3,
        };
        assert_eq!(c.apply(foreign), Applied::Dropped(EntryError::KeyIdMismatch));
        let broken = Change::Put {
            key: keys().route(&h, &rid(1)).into_bytes(),
            value: b"{".to_vec(),
            revision: 4,
        };
        assert_eq!(c.apply(broken), Applied::Dropped(EntryError::Malformed));
        assert!(c.routes(&h).is_empty(), "the store no longer holds the old value");
        let vanity = Change::Put {
            key: keys().route("vanity.test", &rid(1)).into_bytes(),
            value: route_value(1),
            revision: 5,
        };
        assert_eq!(c.apply(vanity), Applied::Changed);
        let unreserved = Change::Put {
            key: keys().route("other.test", &rid(1)).into_bytes(),
            value: route_value(1),
            revision: 6,
        };
        assert_eq!(c.apply(unreserved), Applied::Dropped(EntryError::NotReserved));
        let junk = Change::Put {
            key: b"/edgemux/v1/prod/routes/x".to_vec(),
            value: route_value(1),
            revision: 7,
        };
        assert_eq!(c.apply(junk), Applied::Dropped(EntryError::BadKey));
        assert_eq!(c.dropped("key_id_mismatch"), 1);
        assert_eq!(c.dropped("malformed"), 1);
        assert_eq!(c.dropped("not_reserved"), 1);
        assert_eq!(c.dropped("bad_key"), 1);
    }

    #[test]
    fn over_the_cap_new_entries_are_refused_but_held_ones_still_change() {
        let mut c = cache(3);
        c.apply(put_replica(1, 1));
        c.apply(put_route(&host("a"), 1, 1, 2));
        c.apply(put_route(&host("b"), 1, 1, 3));
        assert_eq!(
            c.apply(put_route(&host("c"), 1, 1, 4)),
            Applied::Dropped(EntryError::OverCapacity)
        );
        assert_eq!(
            c.apply(put_replica(2, 5)),
            Applied::Dropped(EntryError::OverCapacity)
        );
        assert_eq!(c.apply(put_route(&host("a"), 1, 4, 6)), Applied::Changed);
        assert_eq!(members(&c, &host("a")), [(1, 4)]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.dropped("over_capacity"), 2);
        c.apply(del_route(&host("b"), 1, 7));
        assert_eq!(
            c.apply(put_route(&host("c"), 1, 1, 8)),
            Applied::Changed,
            "room again"
        );
    }

    #[test]
    fn a_resync_replaces_everything_at_its_revision() {
        let mut c = cache(MAX_ENTRIES);
        c.apply(put_replica(1, 1));
        c.apply(put_route(&host("gone"), 1, 1, 2));
        // The events after revision 2 were compacted away; the full read at 9 is the truth.
        let read = vec![
            (
                keys().replica(&rid(1)).into_bytes(),
                replica_value(ReplicaState::Draining),
                1,
            ),
            (
                keys().route(&host("new"), &rid(1)).into_bytes(),
                route_value(2),
                8,
            ),
            (keys().route("x.y", &rid(1)).into_bytes(), route_value(2), 8),
        ];
        let dropped = c.reset(9, read);
        assert_eq!(dropped, [EntryError::NotReserved]);
        assert_eq!(c.revision(), 9);
        assert!(c.routes(&host("gone")).is_empty());
        assert_eq!(members(&c, &host("new")), [(1, 2)]);
        assert_eq!(c.replica(&rid(1)).map(|r| r.state), Some(ReplicaState::Draining));
        assert_eq!(
            c.apply(put_route(&host("new"), 1, 5, 7)),
            Applied::Unchanged,
            "older than the read"
        );
        let snap = c.snapshot();
        assert_eq!((snap.revision, snap.replicas.len(), snap.routes.len()), (9, 1, 1));
        assert_eq!(c.hosts_of(&rid(1)), [host("new")]);
        let fresh = c.fresh();
        assert!(fresh.len() == 0 && fresh.revision() == 0);
        assert_eq!(fresh.dropped("not_reserved"), 1, "counts carry over a resync");
    }
}
