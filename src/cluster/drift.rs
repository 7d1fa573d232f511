//! Config drift between replicas, with no I/O: the hash of the settings every replica must agree
//! on, and which other replicas publish a different one.
//!
//! Replicas behind one balancer must give a visitor or a tunnel client the same answer whichever
//! of them it reaches. Each one publishes [`config_hash`] in its replica record; on every change
//! of the store's copy, [`drifted`] names the replicas whose hash is not this one's, and [`Told`]
//! keeps the log to one warning per difference.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use super::store::{ReplicaEntry, ReplicaId};
use crate::config::{Config, Limits, Spread};
use crate::names::KeyFingerprint;

/// Bytes of the SHA-256 digest kept: 128 bits, 32 hex digits. Enough that two different configs
/// never share a hash by chance; short enough to read in a log line.
const HASH_BYTES: usize = 16;

/// The hash of the settings that must agree across replicas, as they are in force: `config`'s
/// (domain, public_port, grants, reserves, `[cluster] spread`: these change only at a restart),
/// the live `limits`, and the keys `authorized_keys` holds now (`None`: open mode, any key).
///
/// Keys are hashed by content (their fingerprints), never by the file's path, and every set is
/// sorted first, so two replicas that list the same things in another order agree.
///
/// Of the limits, two change what a visitor gets whichever replica holds the tunnel:
/// `channels_per_tunnel` decides whether a member takes one more visitor or the next member is
/// tried (the owner's count applies across the hop), and `tunnel_open_timeout` decides how long
/// a member has before the next one is tried (the peer link's deadline too). The others bound
/// one replica's own resources (connections, buffer budget, shares) or a slow peer's time
/// (handshake, header, login, write-idle, upstream): a fleet may size them per machine.
pub(crate) fn config_hash(
    config: &Config,
    limits: &Limits,
    authorized_keys: Option<&HashSet<KeyFingerprint>>,
) -> String {
    let mut text = String::from("edgemux config v1\n");
    // Writing to a String cannot fail.
    let _ = writeln!(text, "domain {}", config.domain);
    let _ = writeln!(text, "public_port {}", config.public_port);
    match authorized_keys {
        None => text.push_str("authorized_keys open\n"),
        Some(keys) => {
            let keys: BTreeSet<&KeyFingerprint> = keys.iter().collect();
            let _ = writeln!(text, "authorized_keys {}", keys.len());
            for key in keys {
                let _ = writeln!(text, "key {key}");
            }
        }
    }
    // Grants of one owner add up (`SshContext` merges them), so they are hashed as pairs.
    let grants: BTreeSet<(&KeyFingerprint, &KeyFingerprint)> = config
        .ssh
        .grants
        .iter()
        .flat_map(|g| g.keys.iter().map(move |k| (&g.owner, k)))
        .collect();
    for (owner, key) in grants {
        let _ = writeln!(text, "grant {owner} {key}");
    }
    let reserved: BTreeMap<&String, &KeyFingerprint> = config.ssh.reserved.iter().collect();
    for (host, key) in reserved {
        let _ = writeln!(text, "reserve {host} {key}");
    }
    let _ = writeln!(text, "channels_per_tunnel {}", limits.channels_per_tunnel);
    let _ = writeln!(
        text,
        "tunnel_open_timeout_ms {}",
        limits.tunnel_open_timeout.as_millis()
    );
    let spread = match config.cluster.as_ref().map(|c| c.spread) {
        None => "none",
        Some(Spread::Even) => "even",
        Some(Spread::LocalFirst) => "local-first",
    };
    let _ = writeln!(text, "spread {spread}");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    digest.as_ref()[..HASH_BYTES]
        .iter()
        .fold(String::with_capacity(2 * HASH_BYTES), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// Another replica whose config hash is not this one's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Drift {
    pub(crate) replica: ReplicaId,
    pub(crate) theirs: String,
}

/// The replicas among `others` (serving or draining) that publish a hash other than `ours`. An
/// empty hash is a replica older than hashes, and an empty `ours` has nothing to compare: neither
/// counts.
pub(crate) fn drifted(ours: &str, others: &[(ReplicaId, ReplicaEntry)]) -> Vec<Drift> {
    if ours.is_empty() {
        return Vec::new();
    }
    others
        .iter()
        .filter(|(_, e)| !e.config_hash.is_empty() && e.config_hash != ours)
        .map(|(rid, e)| Drift {
            replica: rid.clone(),
            theirs: e.config_hash.clone(),
        })
        .collect()
}

/// The differences already logged: each (replica, its hash, ours) is told once while it lasts,
/// and forgotten when it ends, so a difference that comes back is told again.
#[derive(Debug, Default)]
pub(crate) struct Told(HashSet<(Drift, String)>);

impl Told {
    /// Which of the differences `now` (against `ours`) to log: those not told yet.
    pub(crate) fn news(&mut self, ours: &str, now: &[Drift]) -> Vec<Drift> {
        let current: HashSet<(Drift, String)> = now.iter().map(|d| (d.clone(), ours.to_owned())).collect();
        let news = now
            .iter()
            .filter(|d| !self.0.contains(&((*d).clone(), ours.to_owned())))
            .cloned()
            .collect();
        self.0 = current;
        news
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::super::store::ReplicaState;
    use super::*;

    const A: &str = "SHA256:M1EHtmVEQRQ9PRm2LCsyjWSeNzct+SVx/135HLYdUM4";
    const B: &str = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    const C: &str = "SHA256:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA";

    fn fp(text: &str) -> KeyFingerprint {
        KeyFingerprint::parse(text).unwrap()
    }

    /// A config with three grants (one owner twice), two reserves and `[cluster]`; `swapped`
    /// lists the same grants and reserves in another order.
    fn config(swapped: bool) -> Config {
        let grants = [
            format!("[[ssh.grant]]\nowner = \"{A}\"\nkeys = [\"{B}\", \"{C}\"]\n"),
            format!("[[ssh.grant]]\nowner = \"{C}\"\nkeys = [\"{A}\"]\n"),
            format!("[[ssh.grant]]\nowner = \"{A}\"\nkeys = [\"{A}\"]\n"),
        ];
        let reserves = [
            format!("[[ssh.reserve]]\nhost = \"app.example.com\"\nkey = \"{A}\"\n"),
            format!("[[ssh.reserve]]\nhost = \"api.example.com\"\nkey = \"{B}\"\n"),
        ];
        let (mut grants, mut reserves) = (grants.to_vec(), reserves.to_vec());
        if swapped {
            grants.reverse();
            reserves.reverse();
            grants[2] = format!("[[ssh.grant]]\nowner = \"{A}\"\nkeys = [\"{C}\", \"{B}\"]\n");
        }
        let text = format!(
            "domain = \"gw.test\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n{}{}\
             [cluster]\nname = \"t\"\nreplica_name = \"r1\"\nendpoints = [\"http://127.0.0.1:2379\"]\n\
             secret_file = {:?}\n[cluster.peer]\nbind = \"10.0.0.5:7443\"\n",
            grants.concat(),
            reserves.concat(),
            // Validation only looks that the file is there.
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        );
        crate::config::parse(&text).unwrap()
    }

    fn hash(config: &Config, keys: Option<&HashSet<KeyFingerprint>>) -> String {
        config_hash(config, &config.limits, keys)
    }

    #[test]
    fn the_same_settings_in_any_order_hash_the_same() {
        let keys: HashSet<_> = [A, B, C].into_iter().map(fp).collect();
        let reversed: HashSet<_> = [C, B, A].into_iter().map(fp).collect();
        let one = hash(&config(false), Some(&keys));
        assert_eq!(one.len(), 2 * HASH_BYTES);
        assert!(one.bytes().all(|b| b.is_ascii_hexdigit()), "{one}");
        assert_eq!(one, hash(&config(true), Some(&reversed)));
        assert_eq!(one, hash(&config(false), Some(&keys)), "stable");
    }

    #[test]
    fn each_setting_changes_the_hash() {
        let keys: HashSet<_> = [A, B].into_iter().map(fp).collect();
        let base = config(false);
        let ours = hash(&base, Some(&keys));
        let fewer: HashSet<_> = [A].into_iter().map(fp).collect();
        let mut others: Vec<(&str, String)> = vec![
            ("open mode", hash(&base, None)),
            ("another key set", hash(&base, Some(&fewer))),
            ("no keys", hash(&base, Some(&HashSet::new()))),
        ];
        let mut changed = |what: &'static str, edit: &dyn Fn(&mut Config)| {
            let mut c = config(false);
            edit(&mut c);
            others.push((what, hash(&c, Some(&keys))));
        };
        changed("domain", &|c| c.domain = "gw2.test".into());
        changed("public_port", &|c| c.public_port = 8443);
        changed("a grant", &|c| c.ssh.grants[1].keys.push(fp(B)));
        changed("no grants", &|c| c.ssh.grants.clear());
        changed("a reserve's key", &|c| {
            c.ssh.reserved.insert("app.example.com".into(), fp(B));
        });
        changed("a reserve's host", &|c| {
            let key = c.ssh.reserved.remove("app.example.com").unwrap();
            c.ssh.reserved.insert("app2.example.com".into(), key);
        });
        changed("channels_per_tunnel", &|c| c.limits.channels_per_tunnel += 1);
        changed("tunnel_open_timeout", &|c| {
            c.limits.tunnel_open_timeout += Duration::from_millis(1)
        });
        changed("spread", &|c| {
            c.cluster.as_mut().unwrap().spread = Spread::LocalFirst;
        });
        changed("no cluster", &|c| c.cluster = None);
        let mut seen = HashSet::from([ours]);
        for (what, h) in others {
            assert!(seen.insert(h), "{what} did not change the hash");
        }
        let mut other_limits = base.limits.clone();
        other_limits.max_connections += 1;
        other_limits.upstream_timeout += Duration::from_secs(1);
        assert_eq!(
            config_hash(&base, &other_limits, Some(&keys)),
            hash(&base, Some(&keys)),
            "limits a replica sizes for itself do not count"
        );
    }

    fn replica(name: &str, hash: &str) -> (ReplicaId, ReplicaEntry) {
        let entry = ReplicaEntry {
            peer_addr: "127.0.0.1:7443".parse().unwrap(),
            version: "1".into(),
            state: ReplicaState::Serving,
            started: 1,
            config_hash: hash.into(),
        };
        (ReplicaId::new(name, 1), entry)
    }

    #[test]
    fn which_replicas_drift() {
        let draining = {
            let (rid, mut e) = replica("r4", "bbbb");
            e.state = ReplicaState::Draining;
            (rid, e)
        };
        let names = |d: Vec<Drift>| -> Vec<String> { d.into_iter().map(|d| d.replica.to_string()).collect() };
        // What the case is, the other replicas, the ones that differ from "aaaa".
        type Row<'a> = (&'a str, Vec<(ReplicaId, ReplicaEntry)>, Vec<&'a str>);
        let table: Vec<Row> = vec![
            ("alone", vec![], vec![]),
            (
                "all agree",
                vec![replica("r2", "aaaa"), replica("r3", "aaaa")],
                vec![],
            ),
            (
                "one differs",
                vec![replica("r2", "aaaa"), replica("r3", "bbbb")],
                vec!["r3.00000001"],
            ),
            (
                "an older replica publishes none",
                vec![replica("r2", ""), replica("r3", "aaaa")],
                vec![],
            ),
            ("a draining one counts", vec![draining], vec!["r4.00000001"]),
            (
                "two differ",
                vec![replica("r2", "cccc"), replica("r3", "bbbb")],
                vec!["r2.00000001", "r3.00000001"],
            ),
        ];
        for (what, others, want) in table {
            assert_eq!(names(drifted("aaaa", &others)), want, "{what}");
        }
        assert!(
            drifted("", &[replica("r2", "bbbb")]).is_empty(),
            "no hash of our own: nothing to compare"
        );
        let theirs = drifted("aaaa", &[replica("r3", "bbbb")]);
        assert_eq!(theirs[0].theirs, "bbbb");
    }

    #[test]
    fn a_difference_is_told_once_while_it_lasts() {
        let r3 = |hash: &str| drifted("aaaa", &[replica("r3", hash)]);
        let mut told = Told::default();
        assert_eq!(told.news("aaaa", &r3("bbbb")).len(), 1);
        assert!(told.news("aaaa", &r3("bbbb")).is_empty(), "told already");
        assert_eq!(told.news("aaaa", &r3("cccc")).len(), 1, "r3 changed again");
        assert_eq!(
            told.news("dddd", &drifted("dddd", &[replica("r3", "cccc")]))
                .len(),
            1,
            "ours changed"
        );
        assert!(told.news("cccc", &[]).is_empty(), "agreed again");
        assert_eq!(
            told.news("dddd", &drifted("dddd", &[replica("r3", "cccc")]))
                .len(),
            1,
            "a difference that comes back is told again"
        );
    }
}
