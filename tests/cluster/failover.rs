//! A replica lost (SCALEOUT T5, T6). SIGKILL: its tunnel client, in a reconnect loop through the
//! round-robin frontend, re-homes and the host is served through every live frontend within
//! 10 s; the dead replica's entries leave the others within the lease TTL + 2 s; restarted, it
//! rejoins with no stale duplicate. SIGTERM: downloads in flight through the replica complete,
//! its routes leave the others within 1 s of its exit, its tunnel clients are told to reconnect
//! and re-home, and a pool spanning it and another replica answers no request with an error.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;

use crate::common::cluster::{Cluster, Via, LEASE_TTL};
use crate::common::http::{http_backend, pattern_sha256, Visitor};
use crate::common::process::{poll_until, run_bounded, Proc};
use crate::common::ssh::KeyKind;
use crate::common::{TestEnv, SETUP};
use crate::{settle, until};

const MIB: u64 = 1 << 20;
/// SCALEOUT T5's goal: a killed replica's single-member tunnel is served again everywhere.
const SERVED_AGAIN: Duration = Duration::from_secs(10);
/// How long one probe request may take: a dead path must fail fast, not stall the poll.
const PROBE: Duration = Duration::from_secs(3);

/// GET `path` on `host` through `visitor`, bounded by `PROBE`: the status (0 when curl got no
/// answer) and the body.
fn probe(dir: &Path, visitor: &Visitor, host: &str, path: &str) -> (u16, String) {
    let cmd = visitor.curl(host, PROBE, &["-w", "\n%{http_code}", &visitor.url(host, path)]);
    let out = run_bounded(dir, "curl-probe", cmd, PROBE + SETUP);
    let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
    (code.parse().unwrap_or(0), body.to_owned())
}

/// Whether `host` answers `alpha` through `via`.
fn serves(cluster: &Cluster, via: Via, host: &str) -> bool {
    let got = probe(cluster.env.path(), &cluster.visitor(via), host, "/");
    got == (200, "alpha".to_owned())
}

/// The replicas `host` is listed on by replica `n` (empty when it lists no such host).
fn held_on(cluster: &Cluster, n: usize, host: &str) -> Vec<String> {
    let placement = cluster.placement(n, host);
    placement
        .map(|(rs, _)| rs.into_iter().map(|(r, _)| r).collect())
        .unwrap_or_default()
}

#[test]
fn a_killed_replicas_tunnel_is_served_again_everywhere_and_its_entries_expire() {
    let env = TestEnv::new();
    let key = env.key("owner", KeyKind::Ed25519);
    let mut cluster = Cluster::start(env, |c| c);
    let spec = format!("app:80:127.0.0.1:{}", http_backend("alpha"));
    let owner = cluster.reconnecting(&key, &spec, Via::Replica(1), Via::Public);
    let host = key.host("app");
    cluster.wait_placement(&host, &[("r1", 1)]);
    for via in [Via::Public, Via::Replica(2), Via::Replica(3)] {
        settle(
            &format!("served via {via:?} before the kill"),
            || serves(&cluster, via, &host),
            || owner.describe(),
        );
    }

    let killed = cluster.kill(1);
    let expiry = LEASE_TTL + Duration::from_secs(2);
    let no_r1 = |n| !held_on(&cluster, n, &host).contains(&"r1".to_owned());
    let explain = || {
        format!(
            "r2 {:?}, r3 {:?}",
            cluster.placement(2, &host),
            cluster.placement(3, &host)
        )
    };
    until(
        "r1's entries leave r2 and r3",
        expiry,
        || no_r1(2) && no_r1(3),
        explain,
    );
    let gone = killed.elapsed();

    // Through the round-robin frontend, three in a row: each live replica in turn.
    let mut streak = 0;
    let public = |streak: &mut i32| {
        *streak = if serves(&cluster, Via::Public, &host) {
            *streak + 1
        } else {
            0
        };
        *streak >= 3
    };
    settle(
        "served via the public frontend",
        || public(&mut streak),
        || owner.describe(),
    );
    for n in [2, 3] {
        settle(
            &format!("served via r{n}"),
            || serves(&cluster, Via::Replica(n), &host),
            || owner.describe(),
        );
    }
    let served = killed.elapsed();
    eprintln!(
        "r1 SIGKILLed: its entries left r2 and r3 after {gone:?} (lease TTL {LEASE_TTL:?}); the \
         host was served through every live frontend after {served:?}; now held on {:?}",
        cluster.placement(2, &host)
    );
    assert!(
        served <= SERVED_AGAIN,
        "served again after {served:?}, goal {SERVED_AGAIN:?}"
    );

    let took = cluster.restart(1);
    let home = held_on(&cluster, 2, &host);
    assert!(
        home.len() == 1 && home[0] != "r1",
        "one member, re-homed: {home:?}"
    );
    let t = cluster.wait_placement(&host, &[(home[0].as_str(), 1)]);
    settle(
        "served via the restarted r1",
        || serves(&cluster, Via::Replica(1), &host),
        || owner.describe(),
    );
    // Three replica records and one route: nothing left of r1's first life.
    for n in 1..=3 {
        let entries = || cluster.scrape(n).count("edgemux_cluster_directory_entries", &[]);
        settle(
            &format!("r{n}'s directory holds 4 entries"),
            || entries() == 4.0,
            || format!("r{n}: {} entries; tunnels {}", entries(), cluster.tunnels(n)),
        );
    }
    eprintln!("r1 restarted in {took:?}; every replica agreed on one member on {home:?} {t:?} later");
}

/// The drain deadline of the SIGTERM test (`limits.drain_timeout`, the default written out).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the stop may take: the downloads in flight need about 4 s at 16 MiB/s, then the
/// tunnel clients are told to go once their channels have been closed for 500 ms. A stop that
/// lasts half the drain deadline waited on something that was not work in flight.
const STOP_BOUND: Duration = Duration::from_secs(15);
const BULK: u64 = 64 * MIB;

/// A download of `BULK` bytes of the pattern into a file, at 16 MiB/s so it is still running
/// when the test acts.
struct Download {
    what: &'static str,
    curl: Proc,
    file: PathBuf,
}

impl Download {
    fn start(what: &'static str, visitor: &Visitor, host: &str) -> Download {
        let file = visitor.file("download");
        let (url, out) = (
            visitor.url(host, &format!("/bytes/{BULK}")),
            file.display().to_string(),
        );
        let args = [
            "--limit-rate",
            "16M",
            "-o",
            &out,
            "-w",
            "%{http_code} %{size_download}",
            &url,
        ];
        let curl = visitor.spawn(host, Duration::from_secs(60), &args);
        Download { what, curl, file }
    }

    fn received(&self) -> u64 {
        fs::metadata(&self.file).map_or(0, |m| m.len())
    }

    /// Waits for the download to end; asserts status, size and hash.
    fn finish(mut self) {
        let status = self.curl.wait_exit(Duration::from_secs(60));
        let what = self.what;
        assert!(
            status.is_some_and(|s| s.success()),
            "download {what} failed\n{}",
            self.curl.describe()
        );
        assert_eq!(
            self.curl.stdout(),
            format!("200 {BULK}"),
            "download {what}: status and size"
        );
        assert_eq!(
            file_sha256(&self.file),
            pattern_sha256(BULK),
            "download {what}: hash"
        );
    }
}

/// Lowercase hex SHA-256 of a file, read in chunks.
fn file_sha256(path: &Path) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut file = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    data_encoding::HEXLOWER.encode(ctx.finish().as_ref())
}

/// One pool request of the stop run: when it started, its status and body.
type Logged = (Duration, u16, String);

/// Runs `act` while GETs of `/id` on `host` go through `visitor` in a loop, and a second more
/// after it (at least 5 requests); returns what `act` gave and every request.
fn requests_during<T>(
    dir: &Path,
    visitor: &Visitor,
    host: &str,
    act: impl FnOnce() -> T,
) -> (T, Vec<Logged>) {
    let (t0, log) = (Instant::now(), Mutex::new(Vec::<Logged>::new()));
    let stop = AtomicBool::new(false);
    let after = |from: Duration| log.lock().unwrap().iter().filter(|(t, ..)| *t > from).count();
    let result = thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let started = t0.elapsed();
                let (status, body) = probe(dir, visitor, host, "/id");
                log.lock().unwrap().push((started, status, body));
            }
        });
        poll_until(SETUP, || (after(Duration::ZERO) >= 3).then_some(()));
        let result = act();
        let done = t0.elapsed() + Duration::from_secs(1);
        poll_until(SETUP, || (after(done) >= 5).then_some(()));
        stop.store(true, Ordering::Relaxed);
        result
    });
    (result, log.into_inner().unwrap())
}

/// SIGTERM to r1: it stops being ready, exits cleanly, and its routes for `hosts` leave r2 and
/// r3 within 1 s of its exit. Returns how long the stop took.
fn stop_r1(cluster: &mut Cluster, hosts: &[&str]) -> Duration {
    let term = Instant::now();
    cluster.terminate(1);
    let admin = cluster.admin(1);
    let t = settle(
        "r1's /readyz says 503",
        || admin.request("GET", "/readyz").status == 503,
        String::new,
    );
    eprintln!("r1 not ready {t:?} after SIGTERM");
    let (exited, status) = cluster.wait_stopped(1, DRAIN_TIMEOUT * 2);
    assert!(status.success(), "r1 exited with {status}");
    let took = exited - term;
    eprintln!("r1 exited {took:?} after SIGTERM");
    let r1 = "r1".to_owned();
    let left = |n: usize| hosts.iter().all(|h| !held_on(cluster, n, h).contains(&r1));
    let explain = || {
        format!(
            "{:?}",
            hosts.iter().map(|h| cluster.placement(2, h)).collect::<Vec<_>>()
        )
    };
    until(
        "r1's routes leave r2 and r3",
        Duration::from_secs(1),
        || left(2) && left(3),
        explain,
    );
    eprintln!(
        "r1's routes gone from r2 and r3 {:?} after its exit",
        exited.elapsed()
    );
    took
}

#[test]
fn a_stopped_replica_finishes_its_downloads_and_leaves_the_directory_at_once() {
    let env = TestEnv::new();
    let keys = ["big", "far", "pool"].map(|k| env.key(k, KeyKind::Ed25519));
    let mut cluster = Cluster::start(env, |c| c.limit("drain_timeout", "30s"));
    let spec = |name: &str, id: &'static str| format!("{name}:80:127.0.0.1:{}", http_backend(id));
    let big = cluster.reconnecting(&keys[0], &spec("big", "big"), Via::Replica(1), Via::Public);
    let _far = cluster
        .ssh(&keys[1], Via::Replica(3))
        .remote_forward(&spec("far", "far"));
    let _pool_r1 = cluster.reconnecting(&keys[2], &spec("pool", "one"), Via::Replica(1), Via::Public);
    let _pool_r3 = cluster
        .ssh(&keys[2], Via::Replica(3))
        .remote_forward(&spec("pool", "three"));
    let [big_host, far_host, pool_host] = [("big", 0), ("far", 1), ("pool", 2)].map(|(n, k)| keys[k].host(n));
    cluster.wait_placement(&big_host, &[("r1", 1)]);
    cluster.wait_placement(&far_host, &[("r3", 1)]);
    cluster.wait_placement(&pool_host, &[("r1", 1), ("r3", 1)]);

    // In flight through r1: from the owner it holds to a visitor on r2, and from a visitor on
    // r1 to the owner r3 holds.
    let downloads = [
        Download::start("via r2 from r1", &cluster.visitor(Via::Replica(2)), &big_host),
        Download::start("via r1 from r3", &cluster.visitor(Via::Replica(1)), &far_host),
    ];
    let under_way = || downloads.iter().all(|d| d.received() > MIB);
    settle("both downloads under way", under_way, || {
        downloads.iter().map(|d| d.curl.describe()).collect()
    });

    let (dir, visitor) = (cluster.env.path().to_owned(), cluster.visitor(Via::Replica(2)));
    let hosts = [big_host.as_str(), pool_host.as_str()];
    let (took, log) = requests_during(&dir, &visitor, &pool_host, || stop_r1(&mut cluster, &hosts));
    let failed: Vec<&Logged> = log.iter().filter(|(_, s, _)| *s != 200).collect();
    let shares = ["one", "three"].map(|id| log.iter().filter(|(.., b)| b == id).count());
    eprintln!(
        "pool via r2 around the stop: {} requests, r1's member {}, r3's {}",
        log.len(),
        shares[0],
        shares[1]
    );
    assert!(
        failed.is_empty(),
        "pool requests that failed around r1's stop: {failed:?}"
    );

    downloads.into_iter().for_each(Download::finish);
    eprintln!("both 64 MiB downloads in flight through r1 at its SIGTERM completed intact");
    assert!(
        took < STOP_BOUND,
        "r1 took {took:?} to stop (drain deadline {DRAIN_TIMEOUT:?})"
    );

    let told = big.wait_output("Received disconnect", true, SETUP);
    let told: Vec<&str> = told
        .lines()
        .filter(|l| l.contains("Received disconnect"))
        .collect();
    eprintln!("r1's tunnel client was told: {told:?}");
    let rehomed = || {
        let on = held_on(&cluster, 2, &big_host);
        on.len() == 1 && on[0] != "r1"
    };
    let t = settle("the big tunnel re-homes", rehomed, || big.describe());
    eprintln!(
        "held again on {:?}, {t:?} after r1's routes left",
        held_on(&cluster, 2, &big_host)
    );
}
