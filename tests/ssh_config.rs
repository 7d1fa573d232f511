//! `edgemux ssh-config`: its block, written into a config file of its own, lets a plain
//! `ssh -F cfg -N -R app:80:… gw.test` open a tunnel (real OpenSSH and openssl), checked with curl.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::http::{http_backend, Visitor};
use common::process::{run_bounded, Proc};
use common::ssh::KeyKind;
use common::{edgemux, Gateway, TestEnv, DOMAIN, SETUP};

/// `ssh -F CONFIG` with nothing else but the key and a private known_hosts file.
fn plain_ssh(config: &Path, key: &Path, known_hosts: &Path) -> std::process::Command {
    let mut ssh = std::process::Command::new("ssh");
    ssh.arg("-F")
        .arg(config)
        .arg("-i")
        .arg(key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()));
    ssh
}

/// `edgemux ssh-config gw.test` for `gw`'s port, connecting to 127.0.0.1, trusting `ca`.
fn ssh_config(env: &TestEnv, gw: &Gateway, ca: &Path) -> common::process::Output {
    let mut cmd = edgemux();
    let port = gw.port().to_string();
    cmd.args([
        "ssh-config",
        DOMAIN,
        "--port",
        &port,
        "--address",
        "127.0.0.1",
        "--ca",
    ])
    .arg(ca);
    run_bounded(env.path(), "ssh-config", cmd, SETUP)
}

#[test]
fn the_printed_block_is_all_a_plain_ssh_needs() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let key = env.key("dev", KeyKind::Ed25519);
    let out = ssh_config(&env, &gw, &env.pki.ca);
    assert!(out.status.success(), "{}", out.combined());
    let block = out.stdout;
    assert!(block.starts_with(&format!("Host {DOMAIN}\n")), "{block}");
    for line in [
        "ServerAliveInterval",
        "ServerAliveCountMax",
        "ExitOnForwardFailure yes",
        "-verify_return_error",
    ] {
        assert!(block.contains(line), "{line} missing from:\n{block}");
    }
    let config = env.path().join("ssh_config");
    std::fs::write(&config, &block).unwrap();

    // Nothing but the key and a private known_hosts besides the block.
    let backend = http_backend("via-config");
    let mut ssh = plain_ssh(&config, &key.private, &env.path().join("known_hosts"));
    ssh.args(["-N", "-R", &format!("app:80:127.0.0.1:{backend}"), DOMAIN]);
    let tunnel = Proc::spawn(env.path(), "ssh-F", ssh);
    let visitor = Visitor::new(&env, &gw);
    let host = key.host("app");
    let served = common::process::poll_until(SETUP, || {
        let reply = visitor.get(&host, "/id", &[]);
        (reply.status == 200).then(|| reply.text())
    });
    assert_eq!(
        served.as_deref(),
        Some("via-config"),
        "the tunnel never served\n{}",
        tunnel.describe()
    );

    // A CA that is not the gateway's: the ProxyCommand refuses, so ssh never talks to it.
    let stranger = common::pki::Pki::generate(&env.path().join("stranger"));
    let out = ssh_config(&env, &gw, &stranger.ca);
    assert!(out.status.success(), "{}", out.combined());
    std::fs::write(&config, &out.stdout).unwrap();
    let mut ssh = plain_ssh(&config, &key.private, &env.path().join("known_hosts2"));
    ssh.args([DOMAIN, "tunnels"]);
    let out = run_bounded(env.path(), "ssh-wrong-ca", ssh, SETUP);
    assert!(
        !out.status.success(),
        "ssh got through a gateway its CA does not vouch for:\n{}",
        out.combined()
    );

    // Bad input is refused with the reason.
    let mut cmd = edgemux();
    cmd.args(["ssh-config", "gw example"]);
    let out = run_bounded(env.path(), "ssh-config-bad", cmd, SETUP);
    assert!(
        !out.status.success() && out.stderr.contains("is not a host name"),
        "{}",
        out.combined()
    );
}
