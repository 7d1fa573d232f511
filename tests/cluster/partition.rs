//! r1 cut from its peers only (SCALEOUT T8, P2): r1 keeps its lease, so its routes stay in the
//! directory, but r2 cannot reach it. A host held only on r1 gets a 502 via r2 within the peer
//! connect timeout; r1 is ejected (`edgemux_cluster_peer_up{peer="r1"} 0`) and a pool with a
//! member on r3 serves with no error after that; when the link heals, r1 serves again through
//! r2 with nothing restarted.
//!
//! Loopback has no network namespaces, so the cut is a relay: r1 advertises a port of the test's,
//! which forwards to r1's real peer listener and can be switched to hold new connections and
//! stall the old ones (a blackhole: no FIN, no RST), and back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, Via};
use crate::common::http::http_backend;
use crate::common::process::poll_until;
use crate::common::relay::Relay;
use crate::common::ssh::KeyKind;
use crate::common::{TestEnv, SETUP};
use crate::settle;

/// `[cluster.peer] connect_timeout` (its default, set here so the bound below is explicit).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// What a 502 may take beyond the connect timeout: curl, HAProxy and the gateway's own work.
const EPSILON: Duration = Duration::from_millis(500);

/// `edgemux_cluster_peer_up{peer="r1"}` on r2, if exported.
fn r1_up_on_r2(cluster: &Cluster) -> Option<f64> {
    cluster
        .scrape(2)
        .sum("edgemux_cluster_peer_up", &[("peer", "r1")])
}

/// One pool request: start and end (ms since the cut), status, body.
type Logged = (i64, i64, u16, String);

#[test]
fn r1_cut_from_its_peers_gives_fast_502s_for_its_own_hosts_and_recovers_without_restart() {
    let env = TestEnv::new();
    let key = env.key("partition", KeyKind::Ed25519);
    let relay = Relay::start();
    let advertise = relay.addr.to_string();
    let cluster = Cluster::start_each(
        env,
        |c| c.set("cluster.peer.connect_timeout", "1s"),
        move |n, c| {
            if n == 1 {
                c.set("cluster.peer.advertise", advertise.clone())
            } else {
                c
            }
        },
    );
    let real = SocketAddr::from(([127, 0, 0, 1], cluster.replica(1).peer_port()));
    relay.target.set(real).unwrap();

    let member = |n: usize, name: &str, id: &'static str| {
        let spec = format!("{name}:80:127.0.0.1:{}", http_backend(id));
        cluster.ssh(&key, Via::Replica(n)).remote_forward(&spec)
    };
    let _solo = member(1, "solo", "solo");
    let _pool_one = member(1, "app", "one");
    let _pool_three = member(3, "app", "three");
    let (solo, pool) = (key.host("solo"), key.host("app"));
    cluster.wait_placement(&solo, &[("r1", 1)]);
    cluster.wait_placement(&pool, &[("r1", 1), ("r3", 1)]);
    let visitor = cluster.visitor(Via::Replica(2));
    // Before the cut: the pool served through r2 by both members, so r2 holds warm connections
    // and kept-alive streams into r1. The r1-only host is checked through r1 itself: a stream
    // kept alive for it from r2 would carry the next request into the blackhole, which then
    // waits for limits.upstream_timeout (the bytes went upstream; nothing detects the cut on
    // an idle stream yet).
    assert_eq!(
        cluster.visitor(Via::Replica(1)).get(&solo, "/id", &[]).text(),
        "solo"
    );
    let ids: Vec<String> = (0..6).map(|_| visitor.get(&pool, "/id", &[]).text()).collect();
    assert!(
        ids.iter().any(|b| b == "one") && ids.iter().any(|b| b == "three"),
        "{ids:?}"
    );
    settle(
        "r2 reports r1 up",
        || r1_up_on_r2(&cluster) == Some(1.0),
        || format!("{:?}", r1_up_on_r2(&cluster)),
    );

    let t0 = Instant::now();
    let ms = move || t0.elapsed().as_millis() as i64;
    relay.cut();
    let log = Mutex::new(Vec::<Logged>::new());
    let (stop, ejected_at) = (AtomicBool::new(false), Mutex::new(None::<i64>));
    thread::scope(|s| {
        // Pool visitors through r2 all along, four at a time, so one stuck on a stream that
        // was already in r1 when the link went does not stop the others.
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let started = ms();
                    let got = visitor.get(&pool, "/id", &[]);
                    log.lock().unwrap().push((started, ms(), got.status, got.text()));
                }
            });
        }
        // The host held only on r1: a 502, each within the connect timeout.
        for i in 0..4 {
            let started = Instant::now();
            let got = visitor.get(&solo, "/id", &[]);
            let took = started.elapsed();
            eprintln!(
                "r1-only host via r2 after the cut, request {i}: {} in {took:?}",
                got.status
            );
            assert_eq!(got.status, 502, "{}", got.text());
            assert!(took < CONNECT_TIMEOUT + EPSILON, "request {i} took {took:?}");
        }
        let down = settle(
            "r2 reports r1 down",
            || r1_up_on_r2(&cluster) == Some(0.0),
            || format!("{:?}", r1_up_on_r2(&cluster)),
        );
        *ejected_at.lock().unwrap() = Some(ms());
        eprintln!(
            "r1 ejected on r2, seen {down:?} after the four requests ({} ms after the cut)",
            ms()
        );
        let after = |log: &Vec<Logged>, at: i64| log.iter().filter(|(t, ..)| *t >= at).count();
        let at = ms();
        poll_until(SETUP, || (after(&log.lock().unwrap(), at) >= 40).then_some(()));
        stop.store(true, Ordering::Relaxed);
        // Requests stuck in r1 at the cut finish once the link heals.
        relay.heal();
    });
    let healed = Instant::now();
    let ejected = ejected_at.lock().unwrap().expect("ejection seen");
    let log = log.into_inner().unwrap();
    let all: Vec<String> = log
        .iter()
        .map(|(t, e, s, b)| format!("{t}..{e}ms:{s}:{b}"))
        .collect();
    eprintln!(
        "{} pool requests via r2 from the cut (ejection seen at {ejected} ms): {all:?}",
        log.len()
    );
    let failed: Vec<&Logged> = log
        .iter()
        .filter(|(t, _, s, body)| *t >= ejected && (*s != 200 || body != "three"))
        .collect();
    assert!(
        failed.is_empty(),
        "pool requests after the ejection that failed: {failed:?}"
    );
    let scrape = cluster.scrape(2);
    scrape.assert_at_least("edgemux_cluster_peer_ejections_total", &[("peer", "r1")], 1.0);

    // Healed: the r1-only host is served via r2 again, and r1 is up, with nothing restarted.
    let back = settle(
        "the r1-only host served via r2 after the heal",
        || visitor.get(&solo, "/id", &[]).status == 200,
        String::new,
    );
    let up = settle(
        "r2 reports r1 up again",
        || r1_up_on_r2(&cluster) == Some(1.0),
        || format!("{:?}", r1_up_on_r2(&cluster)),
    );
    eprintln!(
        "after the heal: r1-only host served via r2 in {back:?}, r1 up in {:?} (both since the heal: {:?})",
        up,
        healed.elapsed()
    );
    let ids: Vec<String> = (0..10).map(|_| visitor.get(&pool, "/id", &[]).text()).collect();
    eprintln!("pool via r2 after the heal: {ids:?}");
    assert!(ids.iter().all(|b| b == "one" || b == "three"), "{ids:?}");
}
