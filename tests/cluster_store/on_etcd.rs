//! The directory on etcd: propagation, expiry, revoke, compaction, a wiped store, a frozen one,
//! credentials.

use super::*;
use crate::etcd::Etcd;
use std::sync::atomic::{AtomicBool, Ordering};

use edgemux::cluster_store::Keys;

/// A client of the test's etcd, for what the test does behind the stores' backs.
async fn client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_published_by_one_replica_reaches_the_other_and_leaves_with_it() {
    let etcd = Etcd::start();
    let (a, b) = pair(&etcd.endpoint, Duration::from_secs(3)).await;
    let h = host("app");
    a.serve(&h, 2);
    let t = until("B sees A's route", PROPAGATION, || {
        b.sees(&h) == [(a.store.rid().clone(), 2)]
    })
    .await;
    println!("published route seen by the other replica in {t:?}");
    assert!(a.sees(&h).is_empty(), "a replica does not route to itself");
    // Its own entry reaches its cache through its own watch, which may trail B's.
    until("A's own entry in its cache", PROPAGATION, || {
        a.store.lookup().snapshot().routes.len() == 1
    })
    .await;
    let entry = &b.store.lookup().routes(&h)[0].1;
    assert_eq!((entry.key, entry.tcp.get(&5432)), (OWNER, Some(&1)));
    let replica = b.store.lookup().replica(a.store.rid()).unwrap();
    assert_eq!(
        (replica.state, replica.peer_addr.port()),
        (ReplicaState::Serving, 7443)
    );

    a.serve(&h, 3);
    let t = until("B sees the new member count", PROPAGATION, || {
        b.sees(&h) == [(a.store.rid().clone(), 3)]
    })
    .await;
    println!("changed route seen in {t:?}");
    a.unserve(&h);
    let t = until("A's route leaves B", PROPAGATION, || b.sees(&h).is_empty()).await;
    println!("deregistered route gone from the other replica in {t:?}");

    // A write outside the directory's range moves the store's revision; the watcher's progress
    // requests (one per keepalive interval) bring the cache's revision along.
    let mut client = client(&etcd).await;
    let put = client.put("/elsewhere", "x", None).await.unwrap();
    let revision = put.header().unwrap().revision();
    let t = until("progress reaches B's cache", Duration::from_secs(5), || {
        b.store.lookup().snapshot().revision >= revision
    })
    .await;
    println!("watch progress notice advanced the cache in {t:?}");
    assert_eq!(b.store.resyncs("start"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_drains_then_removes_every_route_at_once() {
    let etcd = Etcd::start();
    let (a, b) = pair(&etcd.endpoint, Duration::from_secs(10)).await;
    let hosts = serve_three(&a, &b).await;
    assert!(a.store.set_draining().await);
    let t = until("B sees A draining", PROPAGATION, || {
        b.store.lookup().replica(a.store.rid()).map(|r| r.state) == Some(ReplicaState::Draining)
    })
    .await;
    println!("draining state seen in {t:?}");
    let rid = a.store.rid().clone();
    let stopping = Instant::now();
    a.store.stop().await;
    let stop = stopping.elapsed();
    until("A's routes leave B", PROPAGATION, || {
        hosts.iter().all(|h| b.sees(h).is_empty()) && b.store.lookup().replica(&rid).is_none()
    })
    .await;
    println!(
        "stop (draining record, revoke) took {stop:?}; the replica's routes and record were gone \
         from the other {:?} after the stop began",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_hash_is_published_at_start_and_again_when_it_changes() {
    let etcd = Etcd::start();
    let (a, b) = pair(&etcd.endpoint, Duration::from_secs(10)).await;
    let seen_by_b = || b.store.lookup().replica(a.store.rid()).map(|r| r.config_hash);
    assert_eq!(seen_by_b().as_deref(), Some("hash-at-start-a"));
    let mut changes = a.store.lookup().changes();
    changes.borrow_and_update();
    assert!(a.store.set_config_hash("hash-after-reload".into()).await);
    assert!(
        changes.has_changed().unwrap(),
        "followers of A's changes hear of its own new hash"
    );
    assert_eq!(a.store.lookup().config_hash(), "hash-after-reload");
    let t = until("B sees A's new hash", PROPAGATION, || {
        seen_by_b().as_deref() == Some("hash-after-reload")
    })
    .await;
    println!("a changed config hash reached the other replica in {t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_leaves_when_its_lease_expires() {
    let etcd = Etcd::start();
    let ttl = Duration::from_secs(3);
    let (a, b) = pair(&etcd.endpoint, ttl).await;
    let h = host("app");
    a.serve(&h, 1);
    until("B sees A's route", PROPAGATION, || b.sees(&h).len() == 1).await;
    drop(a);
    let t = until(
        "the dead replica's route expires",
        ttl + Duration::from_secs(2),
        || b.sees(&h).is_empty(),
    )
    .await;
    println!("dead replica's route gone in {t:?} (lease TTL {ttl:?})");
    assert!(t > Duration::from_secs(1), "gone by expiry, not by a revoke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_whose_host_is_not_their_keys_are_dropped_and_counted() {
    let etcd = Etcd::start();
    let b = Replica::start(&config(&etcd.endpoint, "b", Duration::from_secs(3)));
    until("B reads the directory", SETUP, || b.store.resyncs("start") == 1).await;
    let keys = Keys::new(CLUSTER);
    let rogue = ReplicaId::parse("rogue.0badc0de").unwrap();
    let mut client = client(&etcd).await;
    let record = r#"{"peer_addr":"127.0.0.1:1","version":"0","state":"serving","started":0}"#;
    client.put(keys.replica(&rogue), record, None).await.unwrap();
    let value = |key| {
        encode_route(&RouteEntry {
            key,
            http: 1,
            tcp: BTreeMap::new(),
            since: 0,
            upstream: Default::default(),
        })
        .unwrap()
    };
    let stolen = host("bank");
    let start = Instant::now();
    client
        .put(keys.route(&stolen, &rogue), value(OTHER), None)
        .await
        .unwrap();
    client
        .put(keys.route("vanity.example.com", &rogue), value(OTHER), None)
        .await
        .unwrap();
    client
        .put(keys.route("vanity.example.com", &rogue), value(OWNER), None)
        .await
        .unwrap();
    client
        .put(keys.route("plain.example.com", &rogue), value(OWNER), None)
        .await
        .unwrap();
    let lookup = b.store.lookup();
    until("the drops are counted", PROPAGATION, || {
        lookup.dropped("key_id_mismatch") == 1 && lookup.dropped("not_reserved") == 2
    })
    .await;
    until("the reserved vanity host is taken", PROPAGATION, || {
        b.sees("vanity.example.com").len() == 1
    })
    .await;
    println!("foreign entries dropped and counted in {:?}", start.elapsed());
    assert!(
        b.sees(&stolen).is_empty(),
        "a host of another key id is never routed to"
    );
    assert!(b.sees("plain.example.com").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_granted_again_and_everything_republished() {
    let etcd = Etcd::start();
    let (a, b) = pair(&etcd.endpoint, Duration::from_secs(3)).await;
    let hosts = serve_three(&a, &b).await;
    let lost = a.store.lease_id().unwrap();
    let mut client = client(&etcd).await;
    client.lease_revoke(lost).await.unwrap();
    let start = Instant::now();
    until("A's routes leave with the lease", PROPAGATION, || {
        hosts.iter().all(|h| b.sees(h).is_empty())
    })
    .await;
    let t = until("A republishes under a new lease", Duration::from_secs(3), || {
        b.knows(&a) && hosts.iter().all(|h| b.sees(h).len() == 1)
    })
    .await;
    println!(
        "lease revoked behind the replica's back: routes gone, then a new lease and everything \
         republished {t:?} later ({:?} in all)",
        start.elapsed()
    );
    assert_ne!(a.store.lease_id(), Some(lost));
    assert!(a.store.store_up());
}

/// A TCP relay between a store and etcd that a test can cut: every connection through it is
/// closed at once, and new ones are refused, until it heals.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, list) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                list.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Relay { addr, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_past_the_watch_forces_a_resync_that_gets_it_right() {
    let etcd = Etcd::start();
    let ttl = Duration::from_secs(6);
    let target: SocketAddr = etcd.endpoint.trim_start_matches("http://").parse().unwrap();
    let relay = Relay::start(target).await;
    let a = Replica::start(&config(&etcd.endpoint, "a", ttl));
    let b = Replica::start(&config(&format!("http://{}", relay.addr), "b", ttl));
    until("the replicas find each other", SETUP, || {
        a.knows(&b) && b.knows(&a)
    })
    .await;
    let (old, new) = (host("old"), host("new"));
    a.serve(&old, 1);
    until("B sees the old route", PROPAGATION, || b.sees(&old).len() == 1).await;

    // B loses the store; meanwhile A changes its routes and the store compacts them away.
    relay.cut();
    a.unserve(&old);
    a.serve(&new, 1);
    let own = |h: &String| {
        a.store
            .lookup()
            .snapshot()
            .routes
            .iter()
            .any(|(host, _, _)| host == h)
    };
    until("A's writes land", PROPAGATION, || own(&new) && !own(&old)).await;
    let mut client = client(&etcd).await;
    // One more revision, so the compaction goes past every revision B has not seen.
    let put = client.put("/elsewhere", "x", None).await.unwrap();
    let now = put.header().unwrap().revision();
    client
        .compact(now, Some(etcd_client::CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert!(b.sees(&old).len() == 1 && b.sees(&new).is_empty(), "B is cut off");

    let healed = Instant::now();
    relay.heal();
    let t = until("B resyncs", Duration::from_secs(5), || {
        b.store.resyncs("compacted") == 1
    })
    .await;
    assert!(
        b.sees(&old).is_empty() && b.sees(&new).len() == 1,
        "B's cache is right after the resync"
    );
    println!("watch resumed past a compaction, resynced in {t:?} after the store came back");
    assert!(healed.elapsed() < ttl, "B's lease outlived the cut");
    let t = until("B's keepalives get through again", ttl, || b.store.store_up()).await;
    println!("B keeps its lease: store up {t:?} after the resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_hangs_stalls_no_caller_and_is_caught_up_after() {
    let etcd = Etcd::start();
    let ttl = Duration::from_secs(6);
    let (a, b) = pair(&etcd.endpoint, ttl).await;
    let (before, during) = (host("before"), host("during"));
    a.serve(&before, 1);
    until("B sees the first route", PROPAGATION, || {
        b.sees(&before).len() == 1
    })
    .await;

    let pid = etcd.pid().to_string();
    let lease = a.store.lease_id();
    process::send_signal("STOP", &pid);
    let frozen = Instant::now();
    let marking = Instant::now();
    a.serve(&during, 1);
    let mark = marking.elapsed();
    let t = until("A notices the store is gone", ttl / 2, || !a.store.store_up()).await;
    let looking = Instant::now();
    assert_eq!(b.sees(&before).len(), 1, "the cache still answers");
    let lookup = looking.elapsed();
    println!("store hung: marking took {mark:?}, a lookup {lookup:?}; store down noticed in {t:?}");
    assert!(mark < Duration::from_millis(10) && lookup < Duration::from_millis(10));

    process::send_signal("CONT", &pid);
    assert!(frozen.elapsed() < ttl, "thawed within the lease");
    let t = until(
        "the route made during the hang arrives",
        Duration::from_secs(5),
        || b.sees(&during).len() == 1,
    )
    .await;
    println!("route marked during the hang published {t:?} after the store came back");
    until("A's keepalives get through", Duration::from_secs(5), || {
        a.store.store_up()
    })
    .await;
    assert_eq!(a.store.lease_id(), lease, "the lease outlived the hang");
    assert_eq!(b.store.resyncs("start"), 1, "the watch went on; no full read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_authentication_takes_user_and_password_from_a_file() {
    let etcd = Etcd::start();
    let mut client = client(&etcd).await;
    client.user_add("root", "s3cret", None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.auth_enable().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("store-auth");
    std::fs::write(&auth, "root:s3cret\n").unwrap();
    let mut cfg = config(&etcd.endpoint, "a", Duration::from_secs(3));
    cfg.store_auth_file = Some(auth);
    let a = Replica::start(&cfg);
    let h = host("app");
    a.serve(&h, 1);
    let own = |h: &String| {
        a.store
            .lookup()
            .snapshot()
            .routes
            .iter()
            .any(|(host, _, _)| host == h)
    };
    let t = until("the route is published and read back", SETUP, || {
        own(&h) && a.store.store_up()
    })
    .await;
    println!("authenticated store: route published and watched back in {t:?}");

    // etcd 3.4 grants and keeps leases without credentials, but refuses reads and writes: such
    // a replica holds a lease, yet its store is not up.
    let anonymous = Replica::start(&config(&etcd.endpoint, "b", Duration::from_secs(3)));
    until("the anonymous replica gets a lease", SETUP, || {
        anonymous.store.lease_id().is_some()
    })
    .await;
    assert!(!anonymous.store.store_up(), "no directory without credentials");
    assert!(!a.knows(&anonymous), "its record was refused");
}
