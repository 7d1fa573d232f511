//! One pool whose members sit on two replicas (SCALEOUT T4): visitors on r2 reach both members,
//! each getting a fair share (`spread = "even"`, the default), and losing one member's ssh
//! client fails no request but those already in flight at the kill.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, Via};
use crate::common::http::{http_backend, Visitor};
use crate::common::process::{poll_until, run_bounded, Proc};
use crate::common::ssh::KeyKind;
use crate::common::{TestEnv, SETUP};

/// Requests in the spread measurement.
const REQUESTS: usize = 200;
/// The smallest share each of the two members must get (30 %).
const MIN_SHARE: usize = REQUESTS * 3 / 10;

/// `REQUESTS` GETs of `/id` in one curl run (one connection to r2, each request routed on its
/// own); how many each backend id answered, and every other outcome.
fn spread(dir: &Path, visitor: &Visitor, host: &str) -> (usize, usize, Vec<String>) {
    let url = visitor.url(host, "/id");
    let urls = vec![url.as_str(); REQUESTS];
    let mut cmd = visitor.curl(host, SETUP * 3, &["-w", "\t%{http_code}\n"]);
    cmd.args(urls);
    let out = run_bounded(dir, "curl-spread", cmd, SETUP * 4);
    let (mut one, mut three, mut other) = (0, 0, Vec::new());
    for line in out.stdout.lines() {
        match line {
            "one\t200" => one += 1,
            "three\t200" => three += 1,
            _ => other.push(line.to_owned()),
        }
    }
    if one + three != REQUESTS {
        other.push(format!("curl: {}", out.stderr));
    }
    (one, three, other)
}

/// One request of the kill run: start and end (ms since the run began), status, body.
type Logged = (i64, i64, u16, String);

#[test]
fn a_pool_on_r1_and_r3_shares_requests_via_r2_and_survives_losing_a_member() {
    let env = TestEnv::new();
    let key = env.key("pool", KeyKind::Ed25519);
    let cluster = Cluster::start(env, |c| c);
    let member = |n: usize, id: &'static str| {
        let spec = format!("app:80:127.0.0.1:{}", http_backend(id));
        cluster.ssh(&key, Via::Replica(n)).remote_forward(&spec)
    };
    let _one = member(1, "one");
    let three = member(3, "three");
    let host = key.host("app");
    let t = cluster.wait_placement(&host, &[("r1", 1), ("r3", 1)]);
    eprintln!("pool members on r1 and r3 listed everywhere in {t:?}");
    let visitor = cluster.visitor(Via::Replica(2));

    let started = Instant::now();
    let (one, three_count, other) = spread(cluster.env.path(), &visitor, &host);
    eprintln!(
        "{REQUESTS} requests via r2 in {:?}: {one} to the member on r1, {three_count} to the \
         member on r3",
        started.elapsed()
    );
    assert!(
        other.is_empty(),
        "requests that failed or reached no member: {other:?}"
    );
    assert!(
        one >= MIN_SHARE && three_count >= MIN_SHARE,
        "each member must get at least {MIN_SHARE}: r1 {one}, r3 {three_count}"
    );

    let log = kill_during_requests(&visitor, &host, three);
    check_kill_run(&log);
}

/// Requests via r2 in a loop (one curl each, a fresh connection) while the member on r3 (its
/// ssh and the `openssl` it connects through) is SIGKILLed; returns the log, times relative to
/// the kill.
fn kill_during_requests(visitor: &Visitor, host: &str, member: Proc) -> Vec<Logged> {
    let (t0, log) = (Instant::now(), Mutex::new(Vec::<Logged>::new()));
    let (stop, ms) = (AtomicBool::new(false), || t0.elapsed().as_millis() as i64);
    let count_since = |from: i64| log.lock().unwrap().iter().filter(|(t, ..)| *t >= from).count();
    let killed = thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let started = ms();
                let got = visitor.get(host, "/id", &[]);
                log.lock().unwrap().push((started, ms(), got.status, got.text()));
            }
        });
        poll_until(SETUP, || (count_since(0) >= 5).then_some(()));
        drop(member);
        let killed = ms();
        poll_until(SETUP, || (count_since(killed) >= 20).then_some(()));
        stop.store(true, Ordering::Relaxed);
        killed
    });
    let log = log.into_inner().unwrap();
    let shifted: Vec<Logged> = log
        .into_iter()
        .map(|(t, end, s, body)| (t - killed, end - killed, s, body))
        .collect();
    shifted
}

/// Before the kill every request is served; one in flight at the kill may fail, with a 502 and
/// promptly; every request that starts after the kill reaches the survivor on r1.
fn check_kill_run(log: &[Logged]) {
    let all: Vec<String> = log
        .iter()
        .map(|(t, end, s, body)| format!("{t}..{end}ms:{s}:{body}"))
        .collect();
    eprintln!(
        "{} requests via r2 around the kill of r3's member (at 0 ms): {all:?}",
        log.len()
    );
    let before: Vec<&Logged> = log.iter().filter(|(_, end, ..)| *end < 0).collect();
    let in_flight: Vec<&Logged> = log.iter().filter(|(t, end, ..)| *t < 0 && *end >= 0).collect();
    let after: Vec<&Logged> = log.iter().filter(|(t, ..)| *t >= 0).collect();
    assert!(
        before.len() >= 3 && after.len() >= 20,
        "too few requests: {all:?}"
    );
    assert!(
        before.iter().all(|(_, _, s, _)| *s == 200),
        "failures before the kill: {all:?}"
    );
    let prompt = Duration::from_secs(5).as_millis() as i64;
    assert!(
        in_flight
            .iter()
            .all(|(t, end, s, _)| [200, 502].contains(s) && end - t < prompt),
        "a request in flight at the kill hung or got neither 200 nor 502: {all:?}"
    );
    let failed: Vec<&&Logged> = after
        .iter()
        .filter(|(_, _, s, body)| *s != 200 || body != "one")
        .collect();
    assert!(
        failed.is_empty(),
        "requests started after the kill must all reach the member on r1; failed: {failed:?}"
    );
}
