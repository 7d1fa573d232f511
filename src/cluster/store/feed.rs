//! The directory's layout in Redis/Valkey and its change feed, with no I/O (SCALEOUT §3.2,
//! "Redis mapping"). The hash tag `{<cluster>}` keeps every key in one slot, so `MULTI` holds.
//!
//! ```text
//! emx:{<cluster>}:replica:<rid>  STRING  the replica record (JSON), PX lease_ttl: its liveness
//! emx:{<cluster>}:routes:<rid>   HASH    host → route (JSON), PX lease_ttl
//! emx:{<cluster>}:events         STREAM  one entry per write, MAXLEN ~ FEED_MAXLEN
//! ```
//!
//! A feed entry says what one write did (`op` = `up`, `put`, `del`, `clear`, `down`; `rid`,
//! `host`, `val`). [`changes`] turns it into the cache's events on the etcd-style keys of
//! `entry::Keys`, so the one reducer (`cache`) serves both backends. Expiry writes no entry:
//! the watcher finds replicas whose liveness key is gone and feeds [`FeedEvent::Down`] itself.

// Without the Redis backend only the fuzz target and the tests read the feed.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use super::cache::Change;
use super::entry::{EntryError, Keys, ReplicaId, MAX_VALUE};

/// Entries the stream keeps (about; `MAXLEN ~` trims whole nodes). A watcher that falls further
/// behind than this finds a gap and reads everything again; at ≤ 1.2 KiB an entry this is at
/// most ~12 MiB in the store.
pub(crate) const FEED_MAXLEN: usize = 10_000;
/// Fields an entry may carry: `op`, `rid`, `host`, `val`, with room for a newer writer's.
const MAX_FIELDS: usize = 8;
/// A host name is at most 253 bytes (RFC 1035).
const MAX_HOST: usize = 253;
/// A stream id is two `u64`s and a dash.
const MAX_STREAM_ID: usize = 41;

/// The cluster's keys in Redis.
#[derive(Debug, Clone)]
pub(crate) struct RedisKeys {
    root: String,
}

const REPLICA: &str = "replica:";

impl RedisKeys {
    /// `cluster` is a validated `cluster.name` (one DNS label).
    pub(crate) fn new(cluster: &str) -> Self {
        Self {
            root: format!("emx:{{{cluster}}}:"),
        }
    }

    /// The replica's record and liveness key.
    pub(crate) fn replica(&self, rid: &ReplicaId) -> String {
        format!("{}{REPLICA}{rid}", self.root)
    }

    /// The replica's routes, host → route.
    pub(crate) fn routes(&self, rid: &ReplicaId) -> String {
        format!("{}routes:{rid}", self.root)
    }

    /// The prefix of the ACME state (`acme/*` of SCALEOUT §3.2, as plain keys).
    pub(crate) fn acme(&self) -> String {
        format!("{}acme:", self.root)
    }

    pub(crate) fn events(&self) -> String {
        format!("{}events", self.root)
    }

    /// A `SCAN … MATCH` pattern for every replica key (a DNS label holds no glob character).
    pub(crate) fn replica_pattern(&self) -> String {
        format!("{}{REPLICA}*", self.root)
    }

    /// The replica a key from [`Self::replica_pattern`] names.
    pub(crate) fn parse_replica(&self, key: &[u8]) -> Option<ReplicaId> {
        let text = std::str::from_utf8(key).ok()?;
        ReplicaId::parse(text.strip_prefix(&self.root)?.strip_prefix(REPLICA)?)
    }
}

/// One feed entry: what one write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FeedEvent {
    /// `up`: the replica's record was written (a new lease, draining, a new config hash).
    Replica { rid: ReplicaId, value: Vec<u8> },
    /// `put`: one route was written.
    Route {
        rid: ReplicaId,
        host: String,
        value: Vec<u8>,
    },
    /// `del`: one route was deleted.
    Unroute { rid: ReplicaId, host: String },
    /// `clear`: the replica's routes were replaced; its `put`s follow (a republish).
    Clear { rid: ReplicaId },
    /// `down`: the replica left (a clean stop, or its liveness key expired).
    Down { rid: ReplicaId },
}

impl FeedEvent {
    /// The entry's fields, for `XADD`.
    pub(crate) fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let rid = |rid: &ReplicaId| ("rid", rid.as_str().as_bytes().to_vec());
        match self {
            Self::Replica { rid: r, value } => vec![("op", b"up".to_vec()), rid(r), ("val", value.clone())],
            Self::Route { rid: r, host, value } => vec![
                ("op", b"put".to_vec()),
                rid(r),
                ("host", host.as_bytes().to_vec()),
                ("val", value.clone()),
            ],
            Self::Unroute { rid: r, host } => {
                vec![
                    ("op", b"del".to_vec()),
                    rid(r),
                    ("host", host.as_bytes().to_vec()),
                ]
            }
            Self::Clear { rid: r } => vec![("op", b"clear".to_vec()), rid(r)],
            Self::Down { rid: r } => vec![("op", b"down".to_vec()), rid(r)],
        }
    }

    /// Reads an entry's fields. Bounded: at most [`MAX_FIELDS`], a value of at most
    /// [`MAX_VALUE`], a host of at most [`MAX_HOST`]; unknown fields are passed over.
    pub(crate) fn decode<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, EntryError> {
        let (mut op, mut rid, mut host, mut value) = (None, None, None, None);
        for (i, (name, field)) in fields.into_iter().enumerate() {
            if i >= MAX_FIELDS {
                return Err(EntryError::Malformed);
            }
            match name {
                b"op" => op = Some(field),
                b"rid" => rid = Some(field),
                b"host" => host = Some(field),
                b"val" => value = Some(field),
                _ => {}
            }
        }
        let rid = rid
            .and_then(|r| std::str::from_utf8(r).ok())
            .and_then(ReplicaId::parse)
            .ok_or(EntryError::BadKey)?;
        let host = || match host {
            Some(h) if !h.is_empty() && h.len() <= MAX_HOST => std::str::from_utf8(h)
                .map(str::to_owned)
                .map_err(|_| EntryError::BadKey),
            _ => Err(EntryError::BadKey),
        };
        let value = || match value {
            Some(v) if v.len() > MAX_VALUE => Err(EntryError::TooLarge),
            Some(v) => Ok(v.to_vec()),
            None => Err(EntryError::Malformed),
        };
        Ok(match op.ok_or(EntryError::Malformed)? {
            b"up" => Self::Replica { rid, value: value()? },
            b"put" => Self::Route {
                rid,
                host: host()?,
                value: value()?,
            },
            b"del" => Self::Unroute { rid, host: host()? },
            b"clear" => Self::Clear { rid },
            b"down" => Self::Down { rid },
            _ => return Err(EntryError::Malformed),
        })
    }
}

/// The cache's events for one feed entry, at `revision`. `held` lists the hosts the cache holds
/// routes of for a replica (what a `clear` or `down` removes).
pub(crate) fn changes(
    event: FeedEvent,
    keys: &Keys,
    held: impl FnOnce(&ReplicaId) -> Vec<String>,
    revision: i64,
) -> Vec<Change> {
    let delete = |key: String| Change::Delete {
        key: key.into_bytes(),
        revision,
    };
    match event {
        FeedEvent::Replica { rid, value } => vec![Change::Put {
            key: keys.replica(&rid).into_bytes(),
            value,
            revision,
        }],
        FeedEvent::Route { rid, host, value } => vec![Change::Put {
            key: keys.route(&host, &rid).into_bytes(),
            value,
            revision,
        }],
        FeedEvent::Unroute { rid, host } => vec![delete(keys.route(&host, &rid))],
        FeedEvent::Clear { rid } => held(&rid).iter().map(|h| delete(keys.route(h, &rid))).collect(),
        FeedEvent::Down { rid } => {
            let mut out: Vec<Change> = held(&rid).iter().map(|h| delete(keys.route(h, &rid))).collect();
            out.push(delete(keys.replica(&rid)));
            out
        }
    }
}

/// A stream entry id, `<ms>-<seq>`; ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    /// `None` unless `text` is `<u64>-<u64>` (a bare `<u64>` is not an entry's id).
    pub(crate) fn parse(text: &[u8]) -> Option<Self> {
        if text.len() > MAX_STREAM_ID {
            return None;
        }
        let (ms, seq) = std::str::from_utf8(text).ok()?.split_once('-')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !(digits(ms) && digits(seq)) {
            return None;
        }
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Where a watcher is in the feed: the last entry id it read, and how many entries the stream
/// had taken in up to there (`XINFO STREAM` `entries-added`, Redis ≥ 7.0, at a full read, plus
/// every entry read since).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Position {
    pub(crate) last: StreamId,
    pub(crate) consumed: u64,
}

/// Whether entries the watcher has not read were trimmed: the stream has dropped more entries
/// (`added - length`: only trimming drops any, edgemux never `XDEL`s) than the watcher has
/// consumed. Exact, whatever the ids; a store emptied and refilled is found by the reconnect.
pub(crate) fn gap(at: Position, added: u64, length: u64) -> bool {
    added.saturating_sub(length) > at.consumed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rid(s: &str) -> ReplicaId {
        ReplicaId::parse(s).unwrap()
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = RedisKeys::new("prod");
        let r = rid("r1.0000abcd");
        assert_eq!(k.replica(&r), "emx:{prod}:replica:r1.0000abcd");
        assert_eq!(k.routes(&r), "emx:{prod}:routes:r1.0000abcd");
        assert_eq!(k.events(), "emx:{prod}:events");
        assert_eq!(k.replica_pattern(), "emx:{prod}:replica:*");
        assert_eq!(k.parse_replica(k.replica(&r).as_bytes()), Some(r.clone()));
        assert_eq!(k.parse_replica(k.routes(&r).as_bytes()), None);
        assert_eq!(k.parse_replica(b"emx:{other}:replica:r1.0000abcd"), None);
        assert_eq!(k.parse_replica(b"emx:{prod}:replica:R1.x"), None);
    }

    type Fields = Vec<(&'static [u8], Vec<u8>)>;

    fn borrowed(fields: &[(&'static str, Vec<u8>)]) -> Fields {
        fields.iter().map(|(n, v)| (n.as_bytes(), v.clone())).collect()
    }

    fn decode(fields: &[(&'static [u8], Vec<u8>)]) -> Result<FeedEvent, EntryError> {
        FeedEvent::decode(fields.iter().map(|(n, v)| (*n, v.as_slice())))
    }

    #[test]
    fn every_event_round_trips() {
        let r = rid("r2.00000001");
        let events = [
            FeedEvent::Replica {
                rid: r.clone(),
                value: b"{}".to_vec(),
            },
            FeedEvent::Route {
                rid: r.clone(),
                host: "a-k1.gw.test".into(),
                value: b"{\"key\":1}".to_vec(),
            },
            FeedEvent::Unroute {
                rid: r.clone(),
                host: "a-k1.gw.test".into(),
            },
            FeedEvent::Clear { rid: r.clone() },
            FeedEvent::Down { rid: r },
        ];
        for e in events {
            assert_eq!(decode(&borrowed(&e.fields())).unwrap(), e);
        }
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        let ok_rid = (&b"rid"[..], b"r1.00000001".to_vec());
        let cases: [(Fields, EntryError); 7] = [
            (vec![ok_rid.clone()], EntryError::Malformed),
            (vec![(b"op", b"up".to_vec())], EntryError::BadKey),
            (
                vec![(b"op", b"put".to_vec()), ok_rid.clone(), (b"val", b"{}".to_vec())],
                EntryError::BadKey,
            ),
            (
                vec![(b"op", b"up".to_vec()), ok_rid.clone()],
                EntryError::Malformed,
            ),
            (
                vec![
                    (b"op", b"up".to_vec()),
                    ok_rid.clone(),
                    (b"val", vec![b'x'; MAX_VALUE + 1]),
                ],
                EntryError::TooLarge,
            ),
            (
                vec![(b"op", b"zap".to_vec()), ok_rid.clone()],
                EntryError::Malformed,
            ),
            (vec![(b"x", vec![]); MAX_FIELDS + 1], EntryError::Malformed),
        ];
        for (fields, want) in cases {
            assert_eq!(decode(&fields), Err(want), "{fields:?}");
        }
        let long_host = vec![
            (b"op" as &[u8], b"del".to_vec()),
            ok_rid,
            (b"host", vec![b'a'; MAX_HOST + 1]),
        ];
        assert_eq!(decode(&long_host), Err(EntryError::BadKey));
    }

    #[test]
    fn events_become_cache_changes_on_etcd_style_keys() {
        let keys = Keys::new("prod");
        let r = rid("r1.00000001");
        let held = |_: &ReplicaId| vec!["a.gw.test".to_owned(), "b.gw.test".to_owned()];
        let down = changes(FeedEvent::Down { rid: r.clone() }, &keys, held, 7);
        assert_eq!(down.len(), 3);
        assert_eq!(
            down.last(),
            Some(&Change::Delete {
                key: keys.replica(&r).into_bytes(),
                revision: 7
            })
        );
        assert_eq!(
            changes(FeedEvent::Clear { rid: r.clone() }, &keys, held, 8).len(),
            2
        );
        let put = changes(
            FeedEvent::Route {
                rid: r.clone(),
                host: "a.gw.test".into(),
                value: b"v".to_vec(),
            },
            &keys,
            |_| unreachable!("a put needs no held hosts"),
            9,
        );
        assert_eq!(
            put,
            [Change::Put {
                key: keys.route("a.gw.test", &r).into_bytes(),
                value: b"v".to_vec(),
                revision: 9
            }]
        );
    }

    #[test]
    fn stream_ids_parse_and_order() {
        let id = |s: &str| StreamId::parse(s.as_bytes());
        assert_eq!(id("1700000000000-3").unwrap().to_string(), "1700000000000-3");
        assert!(id("5-0") < id("5-1") && id("5-1") < id("6-0"));
        for bad in [
            "",
            "5",
            "-1",
            "5-",
            "a-1",
            "1-1-1",
            "99999999999999999999-0",
            &"1".repeat(50),
        ] {
            assert_eq!(id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_gap_is_more_trimmed_than_consumed() {
        let at = Position {
            last: StreamId::default(),
            consumed: 10,
        };
        assert!(!gap(at, 12, 12), "nothing ever trimmed");
        assert!(!gap(at, 15, 5), "only what was read was trimmed");
        assert!(gap(at, 15, 4), "an entry not read was trimmed");
        assert!(
            !gap(at, 3, 3),
            "a store refilled from nothing: not a gap (the reconnect is)"
        );
    }
}
