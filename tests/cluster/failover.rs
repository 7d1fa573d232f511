//! A replica lost (SCALEOUT T5, T6). SIGKILL: its tunnel client, in a reconnect loop through the
//! round-robin frontend, re-homes and the host is served through every live frontend within
//! 10 s; the dead replica's entries leave the others within the lease TTL + 2 s; restarted, it
//! rejoins with no stale duplicate. SIGTERM: downloads in flight through the replica complete,
//! its routes leave the others within 1 s of its exit, its tunnel clients are told to reconnect
//! and re-home, and a pool spanning it and another replica answers no request with an error.

use std::fs;
use std::io::Read;
use std::path::Path;
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

/// Starts a download of `len` bytes of the pattern into a file, at 16 MiB/s so it is still
/// running when the test acts; returns the curl and the file.
fn slow_download(visitor: &Visitor, host: &str, len: u64) -> (Proc, std::path::PathBuf) {
    let file = visitor.file("download");
    let url = visitor.url(host, &format!("/bytes/{len}"));
    let out = file.display().to_string();
    let args = [
        "--limit-rate",
        "16M",
        "-o",
        &out,
        "-w",
        "%{http_code} %{size_download}",
        &url,
    ];
    (visitor.spawn(host, Duration::from_secs(60), &args), file)
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

#[test]
fn a_stopped_replica_finishes_its_downloads_and_leaves_the_directory_at_once() {
    const LEN: u64 = 64 * MIB;
    let env = TestEnv::new();
    let (big, far, pool) = (
        env.key("big", KeyKind::Ed25519),
        env.key("far", KeyKind::Ed25519),
        env.key("pool", KeyKind::Ed25519),
    );
    let mut cluster = Cluster::start(env, |c| c);
    let spec = |name: &str, id: &'static str| format!("{name}:80:127.0.0.1:{}", http_backend(id));
    let big_owner = cluster.reconnecting(&big, &spec("big", "big"), Via::Replica(1), Via::Public);
    let _far_owner = cluster
        .ssh(&far, Via::Replica(3))
        .remote_forward(&spec("far", "far"));
    let _pool_r1 = cluster.reconnecting(&pool, &spec("pool", "one"), Via::Replica(1), Via::Public);
    let _pool_r3 = cluster
        .ssh(&pool, Via::Replica(3))
        .remote_forward(&spec("pool", "three"));
    let (big_host, far_host, pool_host) = (big.host("big"), far.host("far"), pool.host("pool"));
    cluster.wait_placement(&big_host, &[("r1", 1)]);
    cluster.wait_placement(&far_host, &[("r3", 1)]);
    cluster.wait_placement(&pool_host, &[("r1", 1), ("r3", 1)]);

    // In flight through r1: from the owner it holds to a visitor on r2, and from a visitor on
    // r1 to the owner r3 holds.
    let (mut hop, hop_file) = slow_download(&cluster.visitor(Via::Replica(2)), &big_host, LEN);
    let (mut local, local_file) = slow_download(&cluster.visitor(Via::Replica(1)), &far_host, LEN);
    let size = |f: &Path| fs::metadata(f).map_or(0, |m| m.len());
    settle(
        "both downloads under way",
        || size(&hop_file) > MIB && size(&local_file) > MIB,
        || format!("{}\n{}", hop.describe(), local.describe()),
    );

    let (dir, pool_visitor) = (cluster.env.path().to_owned(), cluster.visitor(Via::Replica(2)));
    let (t0, log) = (Instant::now(), Mutex::new(Vec::<(Duration, u16, String)>::new()));
    let stop = AtomicBool::new(false);
    let (stopped_at, exited_at) = thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let got = probe(&dir, &pool_visitor, &pool_host, "/id");
                log.lock().unwrap().push((t0.elapsed(), got.0, got.1));
            }
        });
        poll_until(SETUP, || (log.lock().unwrap().len() >= 3).then_some(()));
        let term = Instant::now();
        cluster.terminate(1);
        let admin = cluster.admin(1);
        let t = settle(
            "r1's /readyz says 503",
            || admin.request("GET", "/readyz").status == 503,
            String::new,
        );
        eprintln!("r1 not ready {t:?} after SIGTERM");
        let (exited, status) = cluster.wait_stopped(1, Duration::from_secs(60));
        assert!(status.success(), "r1 exited with {status}");
        eprintln!("r1 exited {:?} after SIGTERM", exited - term);
        let leave = |n: usize| {
            [&big_host, &pool_host]
                .iter()
                .all(|h| !held_on(&cluster, n, h).contains(&"r1".to_owned()))
        };
        let explain = || {
            format!(
                "r2 big {:?} pool {:?}",
                cluster.placement(2, &big_host),
                cluster.placement(2, &pool_host)
            )
        };
        until(
            "r1's routes leave r2 and r3",
            Duration::from_secs(1),
            || leave(2) && leave(3),
            explain,
        );
        eprintln!(
            "r1's routes gone from r2 and r3 {:?} after its exit",
            exited.elapsed()
        );
        let after_exit = t0.elapsed();
        poll_until(SETUP, || {
            let log = log.lock().unwrap();
            (log.iter()
                .filter(|(t, ..)| *t > after_exit + Duration::from_secs(1))
                .count()
                >= 5)
                .then_some(())
        });
        stop.store(true, Ordering::Relaxed);
        (term - t0, exited - t0)
    });

    for (what, proc, file) in [
        ("via r2 from r1", &mut hop, &hop_file),
        ("via r1 from r3", &mut local, &local_file),
    ] {
        let status = proc.wait_exit(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "download {what} failed\n{}",
            proc.describe()
        );
        assert_eq!(
            proc.stdout(),
            format!("200 {LEN}"),
            "download {what}: status and size"
        );
        assert_eq!(file_sha256(file), pattern_sha256(LEN), "download {what}: hash");
    }
    eprintln!("both 64 MiB downloads in flight through r1 at its SIGTERM completed intact");

    let told = big_owner.wait_output("Received disconnect", true, SETUP);
    let told: Vec<&str> = told
        .lines()
        .filter(|l| l.contains("Received disconnect"))
        .collect();
    eprintln!("r1's tunnel client was told: {told:?}");
    let rehomed = || {
        let on = held_on(&cluster, 2, &big_host);
        on.len() == 1 && on[0] != "r1"
    };
    let t = settle("the big tunnel re-homes", rehomed, || big_owner.describe());
    eprintln!(
        "its tunnel held again on {:?}, {t:?} after r1's routes left",
        held_on(&cluster, 2, &big_host)
    );

    let log = log.into_inner().unwrap();
    let failed: Vec<&(Duration, u16, String)> = log.iter().filter(|(_, s, _)| *s != 200).collect();
    let shares = ["one", "three"].map(|id| log.iter().filter(|(.., b)| b == id).count());
    eprintln!(
        "pool via r2: {} requests, {} to r1's member, {} to r3's; SIGTERM at {stopped_at:?}, \
         r1 exited at {exited_at:?}",
        log.len(),
        shares[0],
        shares[1],
    );
    assert!(
        failed.is_empty(),
        "pool requests that failed around r1's stop: {failed:?}"
    );
}
