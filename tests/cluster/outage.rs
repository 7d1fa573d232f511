//! The store goes away (SCALEOUT T10, in part): routing runs from each replica's copy, so a
//! frozen store stops nothing that was already known, and a tunnel registered meanwhile is found
//! by asking the other replicas; readiness never depends on the store, and no replica fences
//! itself (every peer says `store=down`: no evidence that the fault is its own); the
//! tunnel lists say the copy is `stale` meanwhile and show other replicas' tunnels as they
//! answer (op `list`), not as the copy has them; a replica restarted meanwhile (new id, empty
//! copy) serves the others' tunnels and its own are served by them; and a store that comes
//! back empty (its data dir wiped) is filled again by the replicas, each republishing what it
//! serves.

use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, Via, LEASE_TTL, REPLICAS};
use crate::common::http::http_backend;
use crate::common::ssh::KeyKind;
use crate::common::store::Backend;
use crate::common::TestEnv;
use crate::{settle, until};

/// How long the frozen store is watched: past a whole lease TTL, so nothing hangs on the lease,
/// and past the store's detected fall (keepalive, `store_timeout`) plus [`FENCE_AFTER`].
const FROZEN_FOR: Duration = Duration::from_secs(8);
/// Short, so the peers are asked (and say `store=down`) well within [`FROZEN_FOR`]; longer than
/// the spread of the replicas' reconnections when the store comes back (up to a 2 s backoff), or
/// the last to reconnect would fence on the first one's `store=up`.
const FENCE_AFTER: &str = "3s";
/// A wiped store is complete again within a lease TTL plus a resync (the goal), with slack for
/// a loaded machine.
const REFILL: Duration = Duration::from_secs(10);
/// Lists follow the other replicas within a round of `list` (every 2 s), with slack.
const LISTED: Duration = Duration::from_secs(6);

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
    // Not fenced because asked: each replica pinged its peers and heard `store=down`.
    for n in 1..=REPLICAS {
        let scrape = cluster.scrape(n);
        let down = scrape.sum("edgemux_cluster_fence_answers_total", &[("answer", "down")]);
        let up = scrape.sum("edgemux_cluster_fence_answers_total", &[("answer", "up")]);
        assert!(
            down.unwrap_or(0.0) >= 1.0,
            "r{n} asked its peers and heard store=down: {down:?}"
        );
        assert_eq!(up.unwrap_or(0.0), 0.0, "no peer of r{n} had the store");
        let stale = scrape.sum("edgemux_cluster_directory_stale", &[]);
        assert_eq!(stale, Some(1.0), "r{n} says its copy is stale");
    }
    let listed = cluster.placement(2, &host);
    assert_eq!(
        listed.map(|(_, n)| n),
        Some(1),
        "r2 still lists r1's tunnel from its copy"
    );

    // A tunnel registered on r1 while the store is frozen is in no copy: r2 asks the other
    // replicas over the peer link (op `lookup`) and finds it.
    let late_spec = format!("late:80:127.0.0.1:{}", http_backend("beta"));
    let late_owner = cluster.ssh(&key, Via::Replica(1)).remote_forward(&late_spec);
    let late = key.host("late");
    let registered = Instant::now();
    let found = until(
        "the tunnel registered during the outage, via r2",
        Duration::from_secs(10),
        || via_r2.get(&late, "/", &[]).status == 200,
        || format!("{:?}", cluster.tunnels(2)),
    );
    eprintln!("a tunnel registered on r1 during the outage served via r2 {found:?} after its ssh -R was started ({:?} since)", registered.elapsed());
    // r2's list shows it too, and stops showing it once it closes: r2 asks the other replicas
    // for their routes (op `list`) while the store is down.
    let listed = until(
        "r2 lists the tunnel registered during the outage",
        LISTED,
        || cluster.placement(2, &late).is_some_and(|(_, n)| n == 1),
        || format!("{:?}", cluster.tunnels(2)),
    );
    drop(late_owner);
    let closed = Instant::now();
    until(
        "r2 no longer lists the tunnel closed during the outage",
        LISTED,
        || cluster.placement(2, &late).is_none(),
        || format!("{:?}", cluster.tunnels(2)),
    );
    eprintln!("during the outage r2 listed the late tunnel {listed:?} after it served, and dropped it {:?} after it closed", closed.elapsed());
    assert_eq!(freshness(&cluster, 2).as_deref(), Some("stale"));

    // r3 restarted while the store is frozen: a new id, an empty copy. It is ready at once,
    // finds r1's tunnel by asking the addresses it remembered, and a tunnel opened on it is
    // found by r2 at r3's old address under its new id.
    cluster.kill(3);
    let took = cluster.restart_alone(3);
    let restarted = Instant::now();
    let ready = until(
        "r3 ready with the store frozen",
        Duration::from_secs(5),
        || cluster.admin(3).request("GET", "/readyz").status == 200,
        || cluster.replica(3).stderr(),
    );
    let via_r3 = cluster.visitor(Via::Replica(3));
    let others = until(
        "r1's tunnel via r3, restarted during the outage",
        LISTED,
        || via_r3.get(&host, "/", &[]).status == 200,
        || format!("{:?}", cluster.tunnels(3)),
    );
    let fresh_spec = format!("fresh:80:127.0.0.1:{}", http_backend("gamma"));
    let _fresh_owner = cluster.ssh(&key, Via::Replica(3)).remote_forward(&fresh_spec);
    let fresh = key.host("fresh");
    let opened = Instant::now();
    let found_fresh = until(
        "the tunnel opened on the restarted r3, via r2",
        LISTED,
        || via_r2.get(&fresh, "/", &[]).status == 200,
        || format!("{:?}", cluster.tunnels(2)),
    );
    let reply = via_r2.get(&fresh, "/", &[]);
    assert_eq!(reply.expect_status(200, "r3's new tunnel via r2").text(), "gamma");
    assert_eq!(
        cluster.placement(2, &fresh).map(|(r, _)| r),
        Some(vec![("r3".to_owned(), 1)]),
        "r2 lists r3's new tunnel"
    );
    eprintln!("r3 restarted during the outage: started in {took:?}, /readyz 200 {ready:?} later, served r1's tunnel {others:?} after, and r2 served the tunnel opened on it {found_fresh:?} after its ssh -R (started {:?} after the restart)", restarted.elapsed().saturating_sub(opened.elapsed()));
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
    for n in 1..=REPLICAS {
        let stale = cluster.scrape(n).sum("edgemux_cluster_directory_stale", &[]);
        assert_eq!(stale, Some(0.0), "r{n}'s copy is fresh again");
    }
}

/// What replica `n`'s tunnel list says of its copy of the directory.
fn freshness(cluster: &Cluster, n: usize) -> Option<String> {
    cluster.tunnels(n)["directory"].as_str().map(str::to_owned)
}
