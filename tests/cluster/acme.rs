//! ACME shared across three replicas (SCALEOUT §7), against a real Pebble whose validation
//! connections reach the fleet through a round-robin balancer (HAProxy, `send-proxy-v2`): one
//! order per name fleet-wide (the per-name lock in the store), validation answered by whichever
//! replica the CA reaches (the answer is in the store), every replica serving the one
//! certificate, a restart of all three ordering nothing, and a frozen store deferring a forced
//! renewal instead of letting every replica order.

use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, Via, REPLICAS};
use crate::common::config::{Listener, ProxyProtocol};
use crate::common::haproxy::Haproxy;
use crate::common::pebble::{self, Challenge, Pebble, ServedCert};
use crate::common::process::poll_until;
use crate::common::prom::{assert_dashboard_metrics_exist, cluster_or_acme, promtool_check};
use crate::common::{TestEnv, DOMAIN};
use crate::until;

/// One issuance with the fleet: the lock, the order, validation, and the others' pickup (about
/// a second apart); with slack for a loaded machine.
const ISSUE: Duration = Duration::from_secs(30);
/// A forced renewal is deferred within two store timeouts (a read, then the lock), plus slack.
const DEFER: Duration = Duration::from_secs(15);
/// A store rebuilt empty gets the certificates back within a sweep (30 s), with slack.
const WRITTEN_BACK: Duration = Duration::from_secs(40);
const ORDERS_OK: (&str, &[(&str, &str)]) = ("edgemux_acme_orders_total", &[("result", "ok")]);

/// Fields drop in order: the balancer and Pebble, then the cluster with its temp dir.
struct AcmeFleet {
    validation: Haproxy,
    pebble: Pebble,
    /// Each replica's public port, in order (the validation balancer's servers).
    publics: Vec<u16>,
    cluster: Cluster,
}

/// Pebble validating on a fixed port where a round-robin frontend spreads its connections over
/// the replicas, which bind fixed ports (the frontend is written before they start, so no
/// validation can find it missing) and order `gw.test` through `challenge`.
fn start(challenge: Challenge) -> AcmeFleet {
    let env = TestEnv::new();
    let ports = pebble::free_ports(1 + REPLICAS);
    let publics: Vec<u16> = ports[1..].to_vec();
    let pebble = pebble::start_validating_on(&env, ports[0]);
    let validation = Haproxy::round_robin_on(env.path(), ports[0], &publics);
    let (directory, api_ca) = (pebble.directory.clone(), pebble.api_ca.display().to_string());
    let challenge = match challenge {
        Challenge::TlsAlpn01 => "tls-alpn-01",
        Challenge::Http01 => "http-01",
    };
    let cluster = Cluster::start_each(
        env,
        move |c| {
            c.certificates(&[])
                .set("acme.directory", directory.clone())
                .set("acme.root_ca", api_ca.clone())
                .set("acme.domains", vec![DOMAIN])
                .set("acme.challenge", challenge)
                .set("acme.contact", vec![format!("mailto:ops@{DOMAIN}")])
        },
        {
            let publics = publics.clone();
            move |n, c| {
                let listener = Listener::bind(&format!("127.0.0.1:{}", publics[n - 1]))
                    .proxy_protocol(ProxyProtocol::Required, &["127.0.0.1/32"]);
                c.listeners(&[listener])
            }
        },
    );
    AcmeFleet {
        validation,
        pebble,
        publics,
        cluster,
    }
}

impl AcmeFleet {
    /// What replica `n` serves for `gw.test`, verified against Pebble's root.
    fn served(&self, n: usize) -> Result<ServedCert, String> {
        self.pebble.handshake(self.cluster.port(Via::Replica(n)), DOMAIN)
    }

    /// Waits until every replica serves one Pebble certificate other than `not`; its serial.
    fn wait_same_certificate(&self, not: Option<&str>) -> (String, Duration) {
        let mut serial = String::new();
        let took = until(
            "every replica serves the same issued certificate",
            ISSUE,
            || {
                let all: Vec<_> = (1..=REPLICAS).map(|n| self.served(n)).collect();
                let first = match &all[0] {
                    Ok(c) if c.is_pebble() && Some(c.serial.as_str()) != not => c.serial.clone(),
                    _ => return false,
                };
                serial = first.clone();
                all.iter().all(|c| c.as_ref().is_ok_and(|c| c.serial == first))
            },
            || format!("{:?}", (1..=REPLICAS).map(|n| self.served(n)).collect::<Vec<_>>()),
        );
        (serial, took)
    }

    /// `edgemux_acme_orders_total{result="ok"}` of each replica.
    fn orders_ok(&self) -> Vec<f64> {
        (1..=REPLICAS)
            .map(|n| self.cluster.scrape(n).count(ORDERS_OK.0, ORDERS_OK.1))
            .collect()
    }

    fn metric(&self, n: usize, name: &str) -> f64 {
        self.cluster.scrape(n).count(name, &[])
    }

    /// The replicas whose log holds `needle`.
    fn logging(&self, needle: &str) -> Vec<usize> {
        (1..=REPLICAS)
            .filter(|&n| self.cluster.replica(n).stderr().contains(needle))
            .collect()
    }

    fn force_renewal(&self, n: usize) {
        let reply = self.cluster.admin(n).request("POST", "/acme/renew");
        assert_eq!(reply.status, 202, "POST /acme/renew on r{n}: {reply:?}");
    }
}

/// One order fleet-wide, checked in Pebble's log and in the replicas' counters; the other two
/// replicas took the certificate from the store.
fn assert_one_order(fleet: &AcmeFleet) -> usize {
    let orders = fleet.orders_ok();
    assert_eq!(orders.iter().sum::<f64>(), 1.0, "orders by replica: {orders:?}");
    assert_eq!(fleet.pebble.orders_placed(), 1, "orders Pebble accepted");
    let orderer = orders.iter().position(|&o| o == 1.0).unwrap_or(0) + 1;
    let adopted: f64 = (1..=REPLICAS)
        .map(|n| fleet.metric(n, "edgemux_acme_certificates_adopted_total"))
        .sum();
    assert_eq!(
        adopted,
        (REPLICAS - 1) as f64,
        "certificates taken from the store"
    );
    orderer
}

#[test]
fn tls_alpn_01_one_order_fleet_wide_any_replica_answers_and_a_restart_orders_nothing() {
    let mut fleet = start(Challenge::TlsAlpn01);
    let (serial, took) = fleet.wait_same_certificate(None);
    let orderer = assert_one_order(&fleet);
    let answered = fleet.logging("answered an ACME TLS-ALPN-01 validation");
    eprintln!(
        "TLS-ALPN-01: all {REPLICAS} replicas serve serial {serial} {took:?} after the cluster formed; \
         one order (by r{orderer}), validation answered by {answered:?} through the round robin"
    );
    assert!(!answered.is_empty(), "no replica logged the validation");
    let scrape = fleet.cluster.scrape(orderer);
    let check = promtool_check(fleet.cluster.env.path(), &scrape.text);
    assert!(
        check.status.success(),
        "promtool check metrics:\n{}",
        check.combined()
    );
    let scrapes: Vec<_> = (1..=REPLICAS).map(|n| fleet.cluster.scrape(n)).collect();
    assert_dashboard_metrics_exist(&scrapes.iter().collect::<Vec<_>>(), cluster_or_acme);
    scrape.assert_value("edgemux_acme_locks_held", &[("kind", "domain")], 0.0);
    scrape.assert_value(
        "edgemux_acme_lock_acquisitions_total",
        &[("result", "acquired")],
        1.0,
    );

    // A restart of all three: the certificates come from each replica's disk at once.
    let restarted = Instant::now();
    for n in 1..=REPLICAS {
        fleet.cluster.kill(n);
    }
    for n in 1..=REPLICAS {
        fleet.cluster.restart(n);
        // The balancer's pinned port reaches r{n} once its health check sees it again (it closes
        // connections until then); the certificate itself is the disk's from the start.
        let first = poll_until(Duration::from_secs(10), || fleet.served(n).ok())
            .unwrap_or_else(|| panic!("r{n} after the restart: {:?}", fleet.served(n)));
        assert_eq!(first.serial, serial, "r{n}'s first handshake after the restart");
    }
    for n in 1..=REPLICAS {
        let log = fleet
            .cluster
            .replica(n)
            .wait_log_within(ISSUE, &["next certificate renewal scheduled"]);
        assert!(
            !log.contains("ACME order placed"),
            "r{n} ordered after the restart:\n{log}"
        );
    }
    assert_eq!(fleet.orders_ok().iter().sum::<f64>(), 0.0);
    assert_eq!(
        fleet.pebble.orders_placed(),
        1,
        "orders Pebble accepted after the restart"
    );
    eprintln!(
        "all {REPLICAS} replicas restarted, serving serial {serial} from their first handshake and scheduled \
         without an order, {:?}",
        restarted.elapsed()
    );

    // Validation that can only reach the other replicas: the orderer's answer is in the store.
    let others: Vec<u16> = (1..=REPLICAS)
        .filter(|&n| n != orderer)
        .map(|n| fleet.publics[n - 1])
        .collect();
    let port = fleet.validation.port;
    fleet.validation.proc.kill_only_self();
    fleet.validation = Haproxy::round_robin_on(fleet.cluster.env.path(), port, &others);
    let forced = Instant::now();
    fleet.force_renewal(orderer);
    let renewed = until(
        "the orderer serves a renewed certificate",
        ISSUE,
        || {
            fleet
                .served(orderer)
                .is_ok_and(|c| c.is_pebble() && c.serial != serial)
        },
        || format!("{:?}", fleet.served(orderer)),
    );
    let fetched = fleet.logging("challenge answer found in the cluster store");
    assert!(
        fetched.iter().all(|&n| n != orderer) && !fetched.is_empty(),
        "the answer was looked up by {fetched:?}, the orderer is r{orderer}"
    );
    assert_eq!(fleet.pebble.orders_placed(), 2);
    eprintln!(
        "forced renewal on r{orderer} validated through r{fetched:?} only (answer read from the store), \
         in service there {renewed:?} after the request ({:?} in all)",
        forced.elapsed()
    );
}

#[test]
fn http_01_one_order_then_a_frozen_store_defers_a_forced_renewal() {
    let mut fleet = start(Challenge::Http01);
    let (serial, took) = fleet.wait_same_certificate(None);
    let orderer = assert_one_order(&fleet);
    let answered = fleet.logging("answered an ACME HTTP-01 validation");
    eprintln!(
        "HTTP-01: all {REPLICAS} replicas serve serial {serial} {took:?} after the cluster formed; \
         one order (by r{orderer}), validation answered by {answered:?} through the round robin"
    );
    assert!(!answered.is_empty(), "no replica logged the validation");

    fleet.cluster.store.proc().freeze();
    let frozen = Instant::now();
    for n in 1..=REPLICAS {
        fleet.force_renewal(n);
    }
    let deferred = until(
        "every replica defers the forced renewal",
        DEFER,
        || (1..=REPLICAS).all(|n| fleet.metric(n, "edgemux_acme_renewals_deferred_total") >= 1.0),
        || {
            let counts: Vec<f64> = (1..=REPLICAS)
                .map(|n| fleet.metric(n, "edgemux_acme_renewals_deferred_total"))
                .collect();
            format!("deferred by replica: {counts:?}")
        },
    );
    for n in 1..=REPLICAS {
        let cert = fleet
            .served(n)
            .unwrap_or_else(|e| panic!("r{n} with the store frozen: {e}"));
        assert_eq!(cert.serial, serial, "r{n} with the store frozen");
    }
    assert_eq!(
        fleet.pebble.orders_placed(),
        1,
        "orders Pebble accepted with the store frozen"
    );
    assert_eq!(fleet.orders_ok().iter().sum::<f64>(), 1.0);
    eprintln!(
        "store frozen: a forced renewal on each of the {REPLICAS} replicas deferred within {deferred:?} \
         (no order), serial {serial} still served everywhere {:?} into the outage",
        frozen.elapsed()
    );

    // Wiped: the store comes back empty, and the replicas write the certificate they serve back
    // from their disks at their next sweep (every 30 s).
    let written = |fleet: &AcmeFleet| -> usize {
        (1..=REPLICAS)
            .map(|n| {
                let log = fleet.cluster.replica(n).stderr();
                log.matches("certificate written to the cluster store").count()
            })
            .sum()
    };
    let before = written(&fleet);
    fleet.cluster.store.restart_empty();
    let back = until(
        "the certificate written back to the wiped store",
        WRITTEN_BACK,
        || written(&fleet) > before,
        || fleet.cluster.replica(1).stderr(),
    );
    for n in 1..=REPLICAS {
        let cert = fleet
            .served(n)
            .unwrap_or_else(|e| panic!("r{n} after the wipe: {e}"));
        assert_eq!(cert.serial, serial, "r{n} after the wipe");
    }
    assert_eq!(
        fleet.pebble.orders_placed(),
        1,
        "orders Pebble accepted after the wipe"
    );
    eprintln!("store wiped: serial {serial} written back to it from the replicas' disks {back:?} after it returned empty; no new order");
}
