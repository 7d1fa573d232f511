//! The deployment kits under `deploy/` are checked here against the real binary and real tools:
//! every edgemux config they ship passes `edgemux check` (paths re-rooted into a temp dir, see
//! `support::reroot`); the systemd unit passes `systemd-analyze verify` without a warning; the
//! Docker HEALTHCHECK probe works against a real admin listener; the Dockerfile's build context
//! holds what the build needs; the Kubernetes manifests and the Terraform are checked in
//! `deploy/kubernetes.rs` and `deploy/terraform.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "deploy/kubernetes.rs"]
mod kubernetes;
#[path = "deploy/support.rs"]
mod support;
#[path = "deploy/terraform.rs"]
mod terraform;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use edgemux::config::{parse_duration, Config, ProxyMode};
use support::{check_passes, deploy, files_with_ext, read, rel, repo, run, text, which};

#[test]
fn every_edgemux_config_under_deploy_passes_check() {
    let mut origins = Vec::new();
    for path in files_with_ext(&deploy(), "toml") {
        check_passes(&rel(&path), &read(&path), &[]);
        origins.push(rel(&path));
    }
    for embedded in kubernetes::embedded_configs() {
        check_passes(&embedded.origin, &embedded.toml, &embedded.provided);
        origins.push(embedded.origin);
    }
    for kit in ["deploy/docker/", "deploy/systemd/", "deploy/kubernetes/"] {
        assert!(
            origins.iter().any(|o| o.starts_with(kit)),
            "no edgemux config found under {kit}; checked: {origins:?}"
        );
    }
}

/// `[Service]` (and other sections') `Key=Value` lines of a unit, in order.
fn unit_entries(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn systemd_config() -> Config {
    let path = deploy().join("systemd/edgemux.toml");
    check_passes(&rel(&path), &read(&path), &[])
}

/// `systemd-analyze verify` on the unit as shipped, with `drop_in` (a file under
/// `deploy/systemd/edgemux.service.d/`) beside it when given: no warning allowed.
fn systemd_verify(drop_in: Option<&str>) {
    let Some(analyze) = which("systemd-analyze") else {
        panic!("systemd-analyze is missing: apt-get install -y systemd");
    };
    let unit = read(&deploy().join("systemd/edgemux.service"));
    assert!(
        unit.contains("/usr/local/bin/edgemux "),
        "the unit runs /usr/local/bin/edgemux"
    );
    // verify insists that ExecStart's executable exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("edgemux.service");
    let bin = env!("CARGO_BIN_EXE_edgemux");
    std::fs::write(&copy, unit.replace("/usr/local/bin/edgemux", bin)).unwrap();
    // verify reads drop-ins from NAME.service.d/ beside the unit it is given.
    if let Some(name) = drop_in {
        let src = deploy().join("systemd/edgemux.service.d").join(name);
        let dropins = dir.path().join("edgemux.service.d");
        std::fs::create_dir(&dropins).unwrap();
        std::fs::write(dropins.join(name), read(&src)).unwrap();
    }
    let mut cmd = Command::new(analyze);
    cmd.arg("verify").arg(&copy).current_dir(dir.path());
    let out = run(cmd, Duration::from_secs(60));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}, drop-in {drop_in:?}) complained:\n{said}",
        out.status
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    systemd_verify(None);
}

#[test]
fn systemd_unit_with_the_cluster_drop_in_passes_systemd_analyze_verify() {
    systemd_verify(Some("cluster.conf"));
}

#[test]
fn systemd_unit_is_hardened_and_matches_its_config() {
    let entries = unit_entries(&read(&deploy().join("systemd/edgemux.service")));
    let values = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> String {
        match values(key).as_slice() {
            [v] => v.to_string(),
            other => panic!("edgemux.service: want one {key}=, found {other:?}"),
        }
    };
    for (key, want) in [
        (
            "ExecStartPre",
            "/usr/local/bin/edgemux check -c /etc/edgemux/edgemux.toml",
        ),
        (
            "ExecStart",
            "/usr/local/bin/edgemux serve -c /etc/edgemux/edgemux.toml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Restart", "on-failure"),
        ("DynamicUser", "yes"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("StateDirectory", "edgemux"),
        ("ConfigurationDirectory", "edgemux"),
        ("LimitNOFILE", "1048576"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
    ] {
        assert_eq!(one(key), want, "edgemux.service: {key}");
    }
    assert!(values("SystemCallFilter").contains(&"@system-service"));

    let cfg = systemd_config();
    let stop = parse_duration(&one("TimeoutStopSec")).unwrap();
    assert!(
        stop > cfg.limits.drain_timeout,
        "TimeoutStopSec {stop:?} must exceed drain_timeout {:?}",
        cfg.limits.drain_timeout
    );
    assert_eq!(
        cfg.certs_dir.to_str(),
        Some("/var/lib/edgemux"),
        "certs_dir = StateDirectory"
    );
    let keys = cfg
        .ssh
        .authorized_keys
        .clone()
        .expect("production config names authorized_keys");
    assert!(
        keys.starts_with("/etc/edgemux/"),
        "authorized_keys in ConfigurationDirectory"
    );
    // LoadCredential=NAME:SOURCE appears to the service as /run/credentials/edgemux.service/NAME.
    let admin = cfg.admin.clone().expect("an [admin] listener");
    let (name, source) = one("LoadCredential")
        .split_once(':')
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .unwrap();
    assert!(
        source.starts_with("/etc/edgemux/"),
        "the credential's source is in /etc/edgemux"
    );
    assert_eq!(
        admin.token_file.as_deref().and_then(|p| p.to_str()),
        Some(format!("/run/credentials/edgemux.service/{name}").as_str()),
        "admin.token_file is the credential the unit loads"
    );
    // The NLB health-checks GET /readyz on the admin port, so it listens on the instance's address
    // (the security group admits only the NLB and the VPC), and the Terraform module checks the
    // port this config binds.
    assert!(
        admin.bind.ip().is_unspecified(),
        "admin reachable by the NLB's health check"
    );
    assert_eq!(
        Some(admin.bind.port().to_string()),
        terraform::variable_default("admin_port"),
        "admin.bind's port is the Terraform module's admin_port (the health-check port)"
    );
    assert_production_listeners(&cfg, "deploy/systemd/edgemux.toml");
    assert!(cfg.acme.is_some(), "the production config uses ACME");
}

/// `LoadCredential=NAME:SOURCE` lines of a unit or drop-in, as `(NAME, SOURCE)`.
fn credentials(unit: &str) -> Vec<(String, String)> {
    unit_entries(unit)
        .into_iter()
        .filter(|(k, _)| k == "LoadCredential")
        .filter_map(|(_, v)| v.split_once(':').map(|(n, s)| (n.to_string(), s.to_string())))
        .collect()
}

#[test]
fn systemd_cluster_variant_passes_check_and_gets_its_files_from_the_drop_in() {
    let path = deploy().join("systemd/edgemux.toml");
    let shipped = read(&path);
    let variant = support::uncomment_settings(&shipped);
    assert_ne!(variant, shipped, "edgemux.toml has commented-out settings");
    let origin = format!("{} (commented settings on)", rel(&path));
    let cfg = check_passes(&origin, &variant, &[]);
    let cluster = cfg.cluster.clone().expect("a commented-out [cluster] section");

    // Every shared file comes from the drop-in, as a credential of this unit.
    let dropin = credentials(&read(&deploy().join("systemd/edgemux.service.d/cluster.conf")));
    let delivered = |path: &std::path::Path| -> Option<String> {
        let name = path
            .strip_prefix("/run/credentials/edgemux.service/")
            .ok()?
            .to_str()?;
        dropin.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone())
    };
    for (key, path) in [
        ("cluster.secret_file", cluster.secret_file.clone()),
        ("ssh.host_key", cfg.ssh.host_key.clone()),
    ] {
        let source = delivered(&path).unwrap_or_else(|| {
            panic!(
                "{key} = {} is no credential of cluster.conf {dropin:?}",
                path.display()
            )
        });
        assert!(
            source.starts_with("/etc/edgemux/"),
            "{key}: its source {source} is in /etc/edgemux"
        );
    }
    assert_eq!(
        dropin.len(),
        2,
        "cluster.conf delivers the secret and the host key: {dropin:?}"
    );

    // The peer listener: a real private address, on the port the Terraform module opens
    // between the instances.
    assert!(!cluster.peer_bind.ip().is_unspecified() && !cluster.peer_bind.ip().is_loopback());
    assert_eq!(
        Some(cluster.peer_bind.port().to_string()),
        terraform::variable_default("peer_port"),
        "peer.bind's port is the Terraform module's peer_port"
    );
    let listener_ports: Vec<u16> = cfg.listeners.iter().map(|l| l.bind.port()).collect();
    assert!(
        !listener_ports.contains(&cluster.peer_bind.port())
            && cfg.admin.as_ref().map(|a| a.bind.port()) != Some(cluster.peer_bind.port()),
        "the peer port is none of the public or admin ports"
    );
    assert!(
        cluster.endpoints.iter().all(|e| e.starts_with("https://")) && cluster.store_tls.is_some(),
        "etcd over TLS"
    );
}

/// 443 behind the NLB with PROXY v2 required from trusted subnets, and port 80 the same way.
fn assert_production_listeners(cfg: &Config, origin: &str) {
    assert_eq!(cfg.public_port, 443, "{origin}: URLs on 443");
    assert_eq!(cfg.listeners.len(), 2, "{origin}: an HTTPS and an HTTP listener");
    for l in &cfg.listeners {
        assert_eq!(
            l.proxy_protocol,
            ProxyMode::Required,
            "{origin}: {} requires PROXY",
            l.bind
        );
        assert!(
            !l.trusted_proxies.is_empty(),
            "{origin}: {} trusts the LB subnets",
            l.bind
        );
    }
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let text = read(&deploy().join("docker/Dockerfile"));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn dockerfile_builds_from_a_complete_context() {
    let steps = dockerfile();
    let has = |s: &str| steps.iter().any(|step| step.contains(s));
    for want in [
        "FROM rust:1-bookworm AS build",
        "cargo build --release --locked",
        "FROM debian:bookworm-slim",
        "ca-certificates",
        "setcap cap_net_bind_service=+ep /usr/local/bin/edgemux",
        "VOLUME /var/lib/edgemux",
        "HEALTHCHECK",
        "COPY . .",
    ] {
        assert!(has(want), "Dockerfile: no {want:?}");
    }
    let user = steps
        .iter()
        .rev()
        .find_map(|s| s.strip_prefix("USER "))
        .expect("a USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("a numeric USER");
    assert_ne!(uid, 0, "the image runs as non-root");

    // What the build and the image need must be in the context, i.e. not dockerignored.
    let ignore = read(&deploy().join("docker/Dockerfile.dockerignore"));
    let mut needed: Vec<String> = [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/lib.rs",
        "vendor/russh/Cargo.toml",
    ]
    .map(String::from)
    .to_vec();
    // Targets Cargo.toml declares explicitly must exist for cargo to read the manifest at all.
    let manifest: toml::Table = toml::from_str(&read(&repo().join("Cargo.toml"))).unwrap();
    for (kind, dir) in [("bench", "benches"), ("test", "tests"), ("example", "examples")] {
        for target in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = target.get("path").and_then(|p| p.as_str()).map(String::from);
            let name = target["name"].as_str().unwrap();
            needed.push(path.unwrap_or_else(|| format!("{dir}/{name}.rs")));
        }
    }
    for step in steps
        .iter()
        .filter(|s| s.starts_with("COPY ") && !s.contains("--from"))
    {
        let words: Vec<&str> = step.split_whitespace().filter(|w| !w.starts_with("--")).collect();
        for src in &words[1..words.len() - 1] {
            if *src != "." {
                assert!(
                    repo().join(src).exists(),
                    "Dockerfile copies {src}, which does not exist"
                );
                needed.push(src.to_string());
            }
        }
    }
    for path in &needed {
        assert!(
            !support::dockerignored(&ignore, path),
            "Dockerfile.dockerignore excludes {path}"
        );
    }
    assert!(
        support::dockerignored(&ignore, "target/release/edgemux"),
        "target/ stays out"
    );
}

#[test]
fn docker_image_config_and_healthcheck_agree() {
    let steps = dockerfile();
    let path = deploy().join("docker/edgemux.toml");
    let cfg = check_passes(&rel(&path), &read(&path), &[]);
    let admin = cfg.admin.expect("the image's config has an [admin] listener");
    let health = steps.iter().find(|s| s.starts_with("HEALTHCHECK")).unwrap();
    assert!(
        health.contains(&format!("\"{}\"", admin.bind)),
        "HEALTHCHECK probes admin.bind {}: {health}",
        admin.bind
    );
    let probe = health.split('"').nth(1).unwrap();
    assert!(
        steps.iter().any(|s| s.starts_with("COPY")
            && s.contains("deploy/docker/healthcheck.sh")
            && s.ends_with(probe)),
        "the HEALTHCHECK command {probe} is healthcheck.sh"
    );
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("COPY")
                && s.contains("deploy/docker/edgemux.toml /etc/edgemux/edgemux.toml")),
        "the image's config is at the path CMD names"
    );
    assert!(steps
        .iter()
        .any(|s| s.starts_with("CMD") && s.contains("\"/etc/edgemux/edgemux.toml\"")));
}

/// A running `edgemux dev` with its admin listener on a free loopback port; killed on drop.
struct Dev {
    child: std::process::Child,
    admin: String,
    main: String,
    _dir: tempfile::TempDir,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev() -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgemux"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--certs",
        ])
        .arg(dir.path().join("certs"))
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut admin, mut main) = (None, None);
    while admin.is_none() || main.is_none() {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("edgemux dev did not report its addresses");
        };
        if let Some(a) = line.strip_prefix("admin ") {
            admin = Some(a.trim().to_string());
        } else if let Some(a) = line.strip_prefix("listening ") {
            main = Some(a.trim().to_string());
        }
    }
    Dev {
        child,
        admin: admin.unwrap(),
        main: main.unwrap(),
        _dir: dir,
    }
}

fn healthcheck(addr: &str) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg(deploy().join("docker/healthcheck.sh")).arg(addr);
    run(cmd, Duration::from_secs(20))
}

#[test]
fn docker_healthcheck_probe_works_against_a_real_admin_listener() {
    let dev = start_dev();
    let ok = healthcheck(&dev.admin);
    assert!(
        ok.status.success(),
        "healthcheck on {}: {}",
        dev.admin,
        text(&ok.stderr)
    );
    // The main listener answers plain HTTP with a redirect, not 200: the probe must say unhealthy.
    let redirect = healthcheck(&dev.main);
    assert!(!redirect.status.success(), "a 308 is not healthy");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    assert!(
        !healthcheck(&closed).status.success(),
        "a closed port is not healthy"
    );
}
