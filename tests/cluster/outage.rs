//! The store goes away (SCALEOUT T10, in part): routing runs from each replica's copy, so a
//! frozen store stops nothing that was already known, and a tunnel registered meanwhile is found
//! by asking the other replicas; readiness never depends on the store, and no replica fences
//! itself (every peer says `store=down`: no evidence that the fault is its own); the
//! tunnel lists say the copy is `stale` meanwhile; and a store that comes back empty (its data
//! dir wiped) is filled again by the replicas, each republishing what it serves.

use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, Via, LEASE_TTL, REPLICAS};
use crate::common::http::http_backend;
use crate::common::ssh::KeyKind;
use crate::common::store::Backend;
use crate::common::TestEnv;
use crate::{settle, until};

/// How long the frozen store is watched: past a whole lease TTL, so nothing hangs on the lease,
/// and past the store's detected fall (keepalive, `store_timeout`) plus [`FENCE_AFTER`].
const FROZEN_FOR: Duration = Duration::from_secs(6);
/// Short, so the peers are asked (and say `store=down`) well within [`FROZEN_FOR`].
const FENCE_AFTER: &str = "1s";
/// A wiped store is complete again within a lease TTL plus a resync (the goal), with slack for
/// a loaded machine.
const REFILL: Duration = Duration::from_secs(10);

#[test]
fn a_frozen_then_wiped_store_stops_no_route_and_is_filled_again() {
    let env = TestEnv::new();
    let key = env.key("owner", KeyKind::Ed25519);
    let mut cluster = Cluster::start(env, |c| c.set("cluster.fence_after", FENCE_AFTER));
    let spec = format!("app:80:127.0.0.1:{}", http_backend("alpha"));
    let _owner = cluster.ssh(&key, Via::Replica(1)).remote_forward(&spec);
    let host = key.host("app");
    cluster.wait_placement(&host, &[("r1", 1)]);
    let via_r2 = cluster.visitor(Via::Replica(2));
    via_r2
        .get(&host, "/", &[])
        .expect_status(200, "via r2 with the store up");
    assert_eq!(freshness(&cluster, 2).as_deref(), Some("ok"));

    // Frozen: keeps its sockets, answers nothing.
    cluster.store.proc().freeze();
    let frozen = Instant::now();
    let stale = until(
        "r2 says its directory is stale",
        Duration::from_secs(10),
        || freshness(&cluster, 2).as_deref() == Some("stale"),
        || format!("{:?}", cluster.tunnels(2)),
    );
    eprintln!("r2 says `stale` {stale:?} after the store froze");
    let mut served = 0;
    while frozen.elapsed() < FROZEN_FOR {
        via_r2
            .get(&host, "/", &[])
            .expect_status(200, "via r2 with the store frozen");
        served += 1;
        for n in 1..=REPLICAS {
            let ready = cluster.admin(n).request("GET", "/readyz");
            assert_eq!(ready.status, 200, "r{n} /readyz with the store frozen");
            let fenced = cluster.scrape(n).sum("edgemux_cluster_fenced", &[]);
            assert_eq!(fenced, Some(0.0), "r{n} fenced in a store-wide outage");
        }
    }
    eprintln!("{served} requests via r2 served while the store was frozen for {FROZEN_FOR:?}; /readyz 200 and edgemux_cluster_fenced 0 on every replica throughout (fence_after {FENCE_AFTER})");
    let listed = cluster.placement(2, &host);
    assert_eq!(
        listed.map(|(_, n)| n),
        Some(1),
        "r2 still lists r1's tunnel from its copy"
    );

    // A tunnel registered on r1 while the store is frozen is in no copy: r2 asks the other
    // replicas over the peer link (op `lookup`) and finds it.
    let late_spec = format!("late:80:127.0.0.1:{}", http_backend("beta"));
    let _late_owner = cluster.ssh(&key, Via::Replica(1)).remote_forward(&late_spec);
    let late = key.host("late");
    let registered = Instant::now();
    let found = until(
        "the tunnel registered during the outage, via r2",
        Duration::from_secs(10),
        || via_r2.get(&late, "/", &[]).status == 200,
        || format!("{:?}", cluster.tunnels(2)),
    );
    eprintln!("a tunnel registered on r1 during the outage served via r2 {found:?} after its ssh -R was started ({:?} since)", registered.elapsed());
    for n in 1..=REPLICAS {
        let fenced = cluster.scrape(n).sum("edgemux_cluster_fenced", &[]);
        assert_eq!(
            fenced,
            Some(0.0),
            "r{n} fenced in a store-wide outage ({:?} frozen)",
            frozen.elapsed()
        );
    }

    // Wiped: a new store with nothing in it at the same address.
    cluster.store.restart_empty();
    let back = Instant::now();
    let refilled = settle(
        "the directory refilled",
        || (1..=REPLICAS).all(|n| freshness(&cluster, n).as_deref() == Some("ok")),
        || {
            format!(
                "{:?}",
                (1..=REPLICAS).map(|n| cluster.tunnels(n)).collect::<Vec<_>>()
            )
        },
    );
    let listed = cluster.wait_placement(&host, &[("r1", 1)]);
    let total = back.elapsed();
    eprintln!(
        "empty store back: every replica `ok` after {refilled:?}, r1's tunnel listed everywhere after {total:?} (lease TTL {LEASE_TTL:?})"
    );
    assert!(
        total <= REFILL,
        "the directory took {total:?} to refill (listed in {listed:?})"
    );
    via_r2
        .get(&host, "/", &[])
        .expect_status(200, "via r2 after the store came back empty");
    // The lease died with the old store: a new one, and everything republished under it; every
    // copy was read again whole. On etcd because the new store's revisions start over (`gap`);
    // on Redis because the watcher's connection broke (`reconnect`: a restart loses entries
    // without trimming them).
    let r1 = cluster.scrape(1);
    r1.assert_at_least("edgemux_cluster_lease_grants_total", &[], 2.0);
    let reason = match cluster.store.backend() {
        Backend::Etcd => "gap",
        Backend::Redis => "reconnect",
    };
    let r2 = cluster.scrape(2);
    r2.assert_at_least("edgemux_cluster_resyncs_total", &[("reason", reason)], 1.0);
}

/// What replica `n`'s tunnel list says of its copy of the directory.
fn freshness(cluster: &Cluster, n: usize) -> Option<String> {
    cluster.tunnels(n)["directory"].as_str().map(str::to_owned)
}
