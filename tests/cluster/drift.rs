//! Config drift (issue "Cluster under faults"): r3 starts with other authorized keys than r1 and
//! r2. `edgemux_cluster_config_mismatch` becomes 1 on all three and r1's or r2's log names r3.
//! Then r3's file is given the same keys and r3 gets SIGHUP: it republishes its hash, and the
//! gauge is 0 on all three. Changed again without a SIGHUP, r3's file is re-read on its own
//! and the gauge is 1 again. r3's file has another path than the others' from the start, so the
//! agreement also shows that keys are compared by content, not by path.

use std::fs;
use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, REPLICAS};
use crate::common::process::send_signal;
use crate::common::ssh::KeyKind;
use crate::common::TestEnv;
use crate::until;

const MISMATCH: &str = "edgemux_cluster_config_mismatch";
/// Every replica reads every record as the store writes it ("well under a second"); a reload's
/// republish is one write.
const NOTICED: Duration = Duration::from_secs(5);
/// A replica re-checks its authorized keys for its hash every 5 s.
const KEYS_FOLLOWED: Duration = Duration::from_secs(5);

/// The gauge on every replica, `None` where it is not exported.
fn gauges(cluster: &Cluster) -> Vec<Option<f64>> {
    (1..=REPLICAS)
        .map(|n| cluster.scrape(n).sum(MISMATCH, &[]))
        .collect()
}

#[test]
fn a_replica_with_other_authorized_keys_is_flagged_on_every_replica_and_named() {
    let env = TestEnv::new();
    let alice = env.key("alice", KeyKind::Ed25519);
    let bob = env.key("bob", KeyKind::Ed25519);
    let read = |k: &crate::common::ssh::SshKey| fs::read_to_string(&k.public).unwrap();
    let (only_alice, alice_and_bob) = (read(&alice), read(&alice) + &read(&bob));
    let r3_keys = env.path().join("r3_authorized_keys");
    fs::write(&r3_keys, &alice_and_bob).unwrap();
    let r3_path = r3_keys.display().to_string();
    let started = Instant::now();
    let cluster = Cluster::start_each(
        env,
        |c| c,
        move |n, c| match n {
            3 => c.set("ssh.authorized_keys", r3_path.clone()),
            _ => c.authorized_keys(&[&alice]),
        },
    );

    let formed = started.elapsed();
    let all_are = |v: f64| gauges(&cluster) == vec![Some(v); REPLICAS];
    until(
        "the mismatch gauge is 1 on all three",
        NOTICED,
        || all_are(1.0),
        || format!("{MISMATCH} on r1..r3: {:?}", gauges(&cluster)),
    );
    let naming_r3 = |n: usize| {
        cluster
            .replica(n)
            .stderr()
            .lines()
            .find(|l| l.contains("WARN") && l.contains("config hash differs") && l.contains("replica=r3."))
            .map(str::to_owned)
    };
    until(
        "r1's or r2's log names r3",
        NOTICED,
        || naming_r3(1).or_else(|| naming_r3(2)).is_some(),
        || cluster.replica(1).stderr(),
    );
    println!(
        "r3 with other authorized keys: mismatch 1 on all three and r3 named {:?} after the \
         start (the cluster formed in {formed:?})",
        started.elapsed()
    );
    println!("{}", naming_r3(1).or_else(|| naming_r3(2)).unwrap_or_default());
    let r3_log = cluster.replica(3).stderr();
    assert!(
        ["replica=r1.", "replica=r2."].iter().all(|r| r3_log
            .lines()
            .any(|l| l.contains("config hash differs") && l.contains(r))),
        "r3 names both others:\n{r3_log}"
    );

    fs::write(&r3_keys, &only_alice).unwrap();
    send_signal("HUP", &cluster.replica(3).pid().to_string());
    let t = until(
        "the mismatch gauge is 0 on all three after r3's reload",
        NOTICED,
        || all_are(0.0),
        || format!("{MISMATCH} on r1..r3: {:?}", gauges(&cluster)),
    );
    println!("r3 given the same keys and SIGHUP: mismatch 0 on all three after {t:?}");
    cluster.replica(1).wait_log(&["config hash agrees again"]);

    // No SIGHUP this time: r3 re-reads its keys file on its own (as at a login) and
    // republishes its hash.
    fs::write(&r3_keys, &alice_and_bob).unwrap();
    let t = until(
        "the mismatch gauge is 1 again after r3's file changed, without a reload",
        NOTICED + KEYS_FOLLOWED,
        || all_are(1.0),
        || format!("{MISMATCH} on r1..r3: {:?}", gauges(&cluster)),
    );
    println!("r3's keys file changed without SIGHUP: mismatch 1 on all three after {t:?}");
}
