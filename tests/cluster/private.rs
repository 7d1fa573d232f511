//! SSH across replicas (SCALEOUT T2, T3): `ssh -L` on r3 reaches a private TCP tunnel held on r1
//! for a granted key, and is refused at r3 with no peer dial for a key without a grant or a
//! target that is no tunnel; `ssh gw tunnels` on r2 lists a tunnel held elsewhere, with its
//! members per replica.

use std::time::Instant;

use crate::common::backend::{echo_server, random_bytes, round_trip};
use crate::common::cluster::{placement, Cluster, Via};
use crate::common::http::http_backend;
use crate::common::ssh::KeyKind;
use crate::common::{TestEnv, SETUP};
use crate::settle;

/// The remote port of the TCP tunnel (any port but 80/443 makes a TCP tunnel).
const PORT: u16 = 5432;

/// Peer streams replica `n` has dialed (`side="out"`, every outcome).
fn dialed(cluster: &Cluster, n: usize) -> f64 {
    cluster
        .scrape(n)
        .count("edgemux_peer_streams_total", &[("side", "out")])
}

/// Peer streams replica `n` has served (`side="in"`, counted as each ends).
fn streams_in(cluster: &Cluster, n: usize) -> f64 {
    cluster
        .scrape(n)
        .count("edgemux_peer_streams_total", &[("side", "in")])
}

#[test]
fn ssh_l_on_r3_reaches_r1s_tunnel_with_a_grant_and_never_dials_without_one() {
    let env = TestEnv::new();
    let owner = env.key("owner", KeyKind::Ed25519);
    let friend = env.key("friend", KeyKind::Ed25519);
    let stranger = env.key("stranger", KeyKind::Ed25519);
    let (o, f) = (owner.clone(), friend.clone());
    let cluster = Cluster::start(env, move |c| c.grant(&o, &[&f]));
    let echo = echo_server();
    let spec = format!("db:{PORT}:127.0.0.1:{echo}");
    let _tunnel = cluster.ssh(&owner, Via::Replica(1)).remote_forward(&spec);
    let host = owner.host("db");
    let t = cluster.wait_placement(&host, &[("r1", 1)]);
    eprintln!("r1's TCP tunnel listed by every replica in {t:?}");

    let fwd = cluster
        .ssh(&friend, Via::Replica(3))
        .local_forward(&format!("{host}:{PORT}"));
    let payload = random_bytes(1 << 20);
    let started = Instant::now();
    let echoed = round_trip(fwd.connect(), &payload, SETUP);
    assert!(
        echoed == payload,
        "granted key via r3: got {} of {} bytes back\n{}",
        echoed.len(),
        payload.len(),
        fwd.proc.describe()
    );
    eprintln!(
        "1 MiB round trip ssh -L on r3 -> r1 -> owner in {:?}",
        started.elapsed()
    );

    // r1 counts an incoming stream when it ends: wait for the granted one to be counted.
    let ended = || streams_in(&cluster, 1) == 1.0;
    settle("the granted stream ends on r1", ended, || cluster.scrape(1).text);
    let (out_before, in_before) = (dialed(&cluster, 3), streams_in(&cluster, 1));
    let stranger_client = cluster.ssh(&stranger, Via::Replica(3));
    let refused = stranger_client.local_forward(&format!("{host}:{PORT}"));
    refused.assert_channel_refused("a key without a grant, on r3");
    let not_a_tunnel = stranger_client.local_forward(&format!("127.0.0.1:{echo}"));
    not_a_tunnel.assert_channel_refused("a target that is no tunnel, on r3");
    let unknown = stranger_client.local_forward(&format!("{}:{PORT}", stranger.host("nothing")));
    unknown.assert_channel_refused("a tunnel nobody holds, on r3");
    assert_eq!(
        dialed(&cluster, 3),
        out_before,
        "r3 dialed a peer for a refused channel\n{}",
        cluster.scrape(3).text
    );
    let in_after = streams_in(&cluster, 1);
    assert_eq!(
        in_after, in_before,
        "a refused channel reached r1's peer listener"
    );
}

#[test]
fn ssh_gw_tunnels_on_r2_lists_members_held_on_r1_and_r3() {
    let env = TestEnv::new();
    let owner = env.key("owner", KeyKind::Ed25519);
    let other = env.key("other", KeyKind::Ed25519);
    let cluster = Cluster::start(env, |c| c);
    let host = owner.host("app");
    let spec = format!("app:80:127.0.0.1:{}", http_backend("alpha"));
    let on_r2 = cluster.ssh(&owner, Via::Replica(2));
    let listed = |want: &[(&str, u64)]| {
        let want: Vec<(String, u64)> = want.iter().map(|&(r, m)| (r.to_owned(), m)).collect();
        let count = want.iter().map(|(_, m)| m).sum();
        placement(&on_r2.tunnels(), &host) == Some((want, count))
    };
    let explain = || format!("`ssh gw tunnels` on r2: {}", on_r2.tunnels());

    let started = Instant::now();
    let _first = cluster.ssh(&owner, Via::Replica(1)).remote_forward(&spec);
    settle("r2 lists the member on r1", || listed(&[("r1", 1)]), explain);
    eprintln!(
        "`ssh gw tunnels` on r2 listed r1's member {:?} after ssh -R",
        started.elapsed()
    );

    let started = Instant::now();
    let _second = cluster.ssh(&owner, Via::Replica(3)).remote_forward(&spec);
    settle(
        "r2 lists members on r1 and r3",
        || listed(&[("r1", 1), ("r3", 1)]),
        explain,
    );
    eprintln!(
        "a second member on r3 listed on r2 {:?} after its ssh -R",
        started.elapsed()
    );

    let others = cluster.ssh(&other, Via::Replica(2)).tunnels();
    assert_eq!(
        placement(&others, &host),
        None,
        "another key's `ssh gw tunnels` lists only its own: {others}"
    );
}
