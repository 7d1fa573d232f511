//! The directory on Redis: propagation, expiry found by the watcher (Redis writes no event for
//! it), a clean stop, a lost liveness key, a gap in the feed, a store restarted empty.

use super::*;
use crate::redis::{commands, Redis};

/// Replica `a`'s route hash key and the feed's key, as `store::feed` names them.
fn routes_key(a: &Replica) -> String {
    format!("emx:{{{CLUSTER}}}:routes:{}", a.store.rid())
}

fn events_key() -> String {
    format!("emx:{{{CLUSTER}}}:events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_published_by_one_replica_reaches_the_other_and_leaves_with_it() {
    let redis = Redis::start();
    let (a, b) = pair(&redis.endpoint, Duration::from_secs(3)).await;
    let h = host("app");
    a.serve(&h, 2);
    let t = until("B sees A's route", PROPAGATION, || {
        b.sees(&h) == [(a.store.rid().clone(), 2)]
    })
    .await;
    println!("redis: published route seen by the other replica in {t:?}");
    assert_eq!(b.store.resyncs("reconnect"), 0, "blocking reads do not time out");
    assert!(a.sees(&h).is_empty(), "a replica does not route to itself");
    let replica = b.store.lookup().replica(a.store.rid()).unwrap();
    assert_eq!(replica.state, ReplicaState::Serving);
    a.serve(&h, 3);
    until("B sees the new member count", PROPAGATION, || {
        b.sees(&h) == [(a.store.rid().clone(), 3)]
    })
    .await;
    a.unserve(&h);
    let t = until("A's route leaves B", PROPAGATION, || b.sees(&h).is_empty()).await;
    println!("redis: deregistered route gone from the other replica in {t:?}");
    assert_eq!(b.store.resyncs("start"), 1);
    assert!(a.store.store_up() && b.store.store_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_leaves_when_its_liveness_key_expires() {
    let redis = Redis::start();
    let ttl = Duration::from_secs(3);
    let (a, b) = pair(&redis.endpoint, ttl).await;
    let h = host("app");
    a.serve(&h, 1);
    until("B sees A's route", PROPAGATION, || b.sees(&h).len() == 1).await;
    let rid = a.store.rid().clone();
    drop(a);
    // The key expires after the TTL; the watcher checks every keepalive interval (TTL / 3).
    let t = until(
        "the dead replica's route expires",
        ttl + ttl / 3 + Duration::from_secs(2),
        || b.sees(&h).is_empty() && b.store.lookup().replica(&rid).is_none(),
    )
    .await;
    println!(
        "redis: dead replica's route gone in {t:?} (TTL {ttl:?}, checked every {:?})",
        ttl / 3
    );
    assert!(t > Duration::from_secs(1), "gone by expiry, not by a revoke");
    assert!(
        b.store.lookup().snapshot().routes.is_empty(),
        "nothing of it is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_removes_every_route_at_once() {
    let redis = Redis::start();
    let (a, b) = pair(&redis.endpoint, Duration::from_secs(10)).await;
    let hosts = serve_three(&a, &b).await;
    let start = Instant::now();
    a.store.stop().await;
    let t = until("every route leaves with the stop", PROPAGATION, || {
        hosts.iter().all(|h| b.sees(h).is_empty())
    })
    .await;
    println!(
        "redis: clean stop took {:?}; routes gone from the other replica {t:?} after it began",
        start.elapsed()
    );
    let left = commands(redis.port, &[format!("EXISTS {}", routes_key(&b))]);
    assert!(left.starts_with(":0"), "B serves nothing: no hash ({left})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_liveness_key_is_granted_again_and_everything_republished() {
    let redis = Redis::start();
    let (a, b) = pair(&redis.endpoint, Duration::from_secs(3)).await;
    let hosts = serve_three(&a, &b).await;
    let lost = a.store.lease_id().unwrap();
    // Behind A's back, as if it had been cut off for a TTL: its keys are gone, with no event.
    let replica_key = format!("emx:{{{CLUSTER}}}:replica:{}", a.store.rid());
    commands(redis.port, &[format!("DEL {replica_key} {}", routes_key(&a))]);
    let start = Instant::now();
    let t = until("A republishes under a new lease", Duration::from_secs(5), || {
        a.store.lease_id().is_some_and(|id| id != lost)
            && b.knows(&a)
            && hosts.iter().all(|h| b.sees(h).len() == 1)
    })
    .await;
    println!("redis: liveness key deleted behind the replica's back: new lease and everything republished in {t:?}");
    assert!(a.store.store_up());
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_feed_forces_a_resync_that_gets_it_right() {
    let redis = Redis::start();
    let (a, b) = pair(&redis.endpoint, Duration::from_secs(10)).await;
    serve_three(&a, &b).await;
    assert_eq!(b.store.resyncs("gap"), 0);
    // Behind the feed's back: a route written to A's hash with no entry, then two entries of
    // which the first is trimmed before any watcher reads it. Only a full read finds the route.
    let hidden = host("hidden");
    let value = String::from_utf8(
        encode_route(&RouteEntry {
            key: OWNER,
            http: 1,
            tcp: BTreeMap::new(),
            since: 1,
            upstream: Default::default(),
        })
        .unwrap(),
    )
    .unwrap();
    let events = events_key();
    let answer = commands(
        redis.port,
        &[
            "MULTI".into(),
            format!("HSET {} {hidden} '{value}'", routes_key(&a)),
            format!("XADD {events} * op noop rid {}", a.store.rid()),
            format!("XADD {events} * op noop rid {}", a.store.rid()),
            format!("XTRIM {events} MAXLEN 1"),
            "EXEC".into(),
        ],
    );
    assert!(!answer.contains("-ERR"), "{answer}");
    let t = until(
        "B reads everything again after the gap",
        Duration::from_secs(5),
        || b.store.resyncs("gap") >= 1 && b.sees(&hidden).len() == 1,
    )
    .await;
    println!("redis: a trimmed feed entry found and the directory read again in {t:?}");
    assert_eq!(b.store.resyncs("reconnect"), 0, "the connection never broke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restarted_empty_is_refilled_by_every_replica() {
    let mut redis = Redis::start();
    let (a, b) = pair(&redis.endpoint, Duration::from_secs(3)).await;
    let hosts = serve_three(&a, &b).await;
    let lost = a.store.lease_id().unwrap();
    redis.restart_empty();
    let start = Instant::now();
    let t = until("A's routes are back in B's copy", Duration::from_secs(10), || {
        a.store.lease_id().is_some_and(|id| id != lost)
            && b.knows(&a)
            && a.knows(&b)
            && hosts.iter().all(|h| b.sees(h).len() == 1)
    })
    .await;
    println!("redis: restarted empty; refilled in {t:?}");
    let reconnects = b.store.resyncs("reconnect");
    assert!(
        reconnects >= 1,
        "B read everything again after the reconnect ({reconnects})"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}
