//! r1 cut from the store only (SCALEOUT §3.5, fencing): its lease expires, so its routes leave
//! r2 and r3 within the TTL; after `fence_after` r1, whose peers still say `store=up`, fences
//! itself: `/readyz` 503, `edgemux_cluster_fenced` 1 (on r1 only), its SSH clients told to
//! reconnect. The tunnel client re-homes through the round-robin frontend and its host is served
//! from every frontend but r1's own (marked down by its health check, as intended). Healed, r1
//! gets a new lease and un-fences.
//!
//! Loopback has no network namespaces, so the cut is a relay: r1's `[cluster] endpoints` is a
//! port of the test's, which forwards to the store and can be switched to hold new connections and
//! stall the old ones (a blackhole: no FIN, no RST), and back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, Via, LEASE_TTL};
use crate::common::http::http_backend;
use crate::common::relay::Relay;
use crate::common::ssh::KeyKind;
use crate::common::store::Backend;
use crate::common::TestEnv;
use crate::{settle, until};

const FENCE_AFTER: Duration = Duration::from_secs(3);
/// Beyond the TTL: the keepalive that finds the cut, and the peers' watch delivering the deletes.
const MARGIN: Duration = Duration::from_secs(3);
const FENCED: &str = "edgemux_cluster_fenced";

fn fenced(cluster: &Cluster, n: usize) -> Option<f64> {
    cluster.scrape(n).sum(FENCED, &[])
}

fn readyz(cluster: &Cluster, n: usize) -> u16 {
    cluster.admin(n).request("GET", "/readyz").status
}

/// Whether replica `n` lists `host` with a member on r1.
fn lists_r1(cluster: &Cluster, n: usize, host: &str) -> bool {
    cluster
        .placement(n, host)
        .is_some_and(|(replicas, _)| replicas.iter().any(|(r, _)| r == "r1"))
}

#[test]
fn r1_cut_from_the_store_fences_itself_its_client_rehomes_and_it_unfences_on_heal() {
    let env = TestEnv::new();
    let key = env.key("fence", KeyKind::Ed25519);
    let relay = Relay::start();
    let (relay_addr, target) = (relay.addr, relay.target.clone());
    let cluster = Cluster::start_each(
        env,
        |c| c.set("cluster.fence_after", format!("{}s", FENCE_AFTER.as_secs())),
        move |n, c| {
            if n != 1 {
                return c;
            }
            // The harness has written the store's endpoint; r1 gets the relay in front of it.
            let text = c.render();
            let scheme = Backend::from_env().scheme();
            let prefix = format!("{scheme}://127.0.0.1:");
            let at = text.find(&prefix).expect("store endpoint in the config");
            let port: String = text[at + prefix.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let _ = target.set(SocketAddr::from(([127, 0, 0, 1], port.parse().unwrap())));
            c.set("cluster.endpoints", vec![format!("{scheme}://{relay_addr}")])
        },
    );
    let spec = format!("fence:80:127.0.0.1:{}", http_backend("fence"));
    let _client = cluster.reconnecting(&key, &spec, Via::Replica(1), Via::Public);
    let host = key.host("fence");
    cluster.wait_placement(&host, &[("r1", 1)]);
    for n in 1..=3 {
        assert_eq!(fenced(&cluster, n), Some(0.0), "r{n} before the cut");
    }

    let t0 = Instant::now();
    relay.cut();
    let left = until(
        "r1's route leaves r2 and r3",
        LEASE_TTL + MARGIN,
        || !lists_r1(&cluster, 2, &host) && !lists_r1(&cluster, 3, &host),
        || {
            format!(
                "{:?} / {:?}",
                cluster.placement(2, &host),
                cluster.placement(3, &host)
            )
        },
    );
    eprintln!("r1's route left r2 and r3 {left:?} after the cut");
    let fenced_in = until(
        "r1 fenced: /readyz 503 and the gauge 1",
        LEASE_TTL + FENCE_AFTER + MARGIN,
        || fenced(&cluster, 1) == Some(1.0) && readyz(&cluster, 1) == 503,
        || format!("gauge {:?}, readyz {}", fenced(&cluster, 1), readyz(&cluster, 1)),
    );
    let fenced_at = t0.elapsed();
    eprintln!("r1 fenced {fenced_at:?} after the cut");
    assert!(
        fenced_at >= FENCE_AFTER,
        "fenced before fence_after: {fenced_in:?}"
    );
    // The evidence: the peers said their store serves them.
    let up = cluster
        .scrape(1)
        .sum("edgemux_cluster_fence_answers_total", &[("answer", "up")]);
    assert!(
        up.unwrap_or(0.0) >= 1.0,
        "r1 fenced on a peer's `store=up`: {up:?}"
    );
    for n in [2, 3] {
        assert_eq!(fenced(&cluster, n), Some(0.0), "r{n} must not fence");
        assert_eq!(readyz(&cluster, n), 200, "r{n} stays ready");
    }
    let deadline = (LEASE_TTL + FENCE_AFTER + Duration::from_secs(10)).saturating_sub(t0.elapsed());
    let frontends = [Via::Public, Via::Replica(2), Via::Replica(3)];
    let served = until(
        "the re-homed host served from every frontend",
        deadline,
        || {
            frontends
                .iter()
                .all(|&via| cluster.visitor(via).get(&host, "/id", &[]).text() == "fence")
        },
        || format!("{:?}", cluster.placement(2, &host)),
    );
    eprintln!(
        "host served from every frontend {:?} after the cut ({served:?} after the fence)",
        t0.elapsed()
    );
    assert!(!lists_r1(&cluster, 2, &host), "the client re-homed away from r1");

    let healed = Instant::now();
    relay.heal();
    settle(
        "r1 un-fenced after the heal",
        || fenced(&cluster, 1) == Some(0.0) && readyz(&cluster, 1) == 200,
        || format!("gauge {:?}, readyz {}", fenced(&cluster, 1), readyz(&cluster, 1)),
    );
    eprintln!("r1 un-fenced {:?} after the heal", healed.elapsed());
}
