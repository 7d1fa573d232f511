//! Integration-test harness: a temp dir per test with a throwaway PKI, the `edgemux` binary
//! started on `127.0.0.1:0` (ports learned from its stdout, never guessed, never slept for), and
//! real peers (`ssh`, `openssl`, `curl`) as child processes killed on drop.
//!
//! Each test crate uses a different subset of this module.
#![allow(dead_code)]

pub mod backend;
pub mod cluster;
pub mod config;
pub mod etcd;
pub mod flood;
pub mod haproxy;
pub mod http;
pub mod pebble;
pub mod pki;
pub mod process;
pub mod prom;
pub mod redis;
pub mod relay;
pub mod russh_client;
pub mod ssh;
pub mod store;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use config::GatewayBuilder;
use pki::Pki;
use ssh::{KeyKind, SshClient, SshKey, Transport};

/// The tunnel domain of every test gateway.
pub const DOMAIN: &str = "gw.test";

/// Deadline for setup steps (start, ssh login, tunnel registration). Generous: tests run in
/// parallel on small machines, and a deadline only costs time when something is broken.
pub const SETUP: Duration = Duration::from_secs(20);

/// How many of the gateway's last log lines a failed `wait_log` shows (the whole log is printed
/// when the test's `Gateway` drops).
const LOG_TAIL: usize = 30;

const TOOLS: [&str; 4] = ["ssh", "ssh-keygen", "openssl", "curl"];
const INSTALL_HINT: &str = "apt-get install -y openssh-client openssl curl";

/// Panics with the install line when a peer program is missing: these tests never skip.
pub fn require_tools() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in TOOLS {
        let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
        assert!(
            found,
            "the integration tests need `{tool}` on PATH; install it with: {INSTALL_HINT}"
        );
    }
}

/// `edgemux` as built by cargo for these tests.
pub fn edgemux() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgemux"))
}

/// `edgemux keyid PUB`, checked to be 8 lowercase base32 characters.
pub fn keyid(public: &Path) -> String {
    let out = edgemux()
        .arg("keyid")
        .arg(public)
        .output()
        .expect("run edgemux keyid");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "edgemux keyid failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base32 = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    assert!(id.len() == 8 && id.chars().all(base32), "bad key id {id:?}");
    id
}

/// `edgemux keyid --fingerprint PUB`, checked to be exactly what OpenSSH's `ssh-keygen -lf`
/// prints for the key: the full identity grants and reservations name.
pub fn fingerprint(public: &Path) -> String {
    let out = edgemux()
        .args(["keyid", "--fingerprint"])
        .arg(public)
        .output()
        .expect("run edgemux keyid --fingerprint");
    assert!(
        out.status.success(),
        "edgemux keyid --fingerprint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let keygen = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(public)
        .output()
        .expect("run ssh-keygen -lf");
    let keygen = String::from_utf8_lossy(&keygen.stdout).into_owned();
    let theirs = keygen.split_whitespace().nth(1).unwrap_or_default();
    assert_eq!(ours, theirs, "edgemux and ssh-keygen disagree on the fingerprint");
    ours
}

/// One test's world: temp dir, PKI, keys, and the gateways it starts.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        require_tools();
        let dir = tempfile::Builder::new()
            .prefix("edgemux-")
            .tempdir()
            .expect("temp dir");
        let pki = Pki::generate(dir.path());
        TestEnv { dir, pki }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn key(&self, name: &str, kind: KeyKind) -> SshKey {
        SshKey::generate(self.path(), name, kind)
    }

    pub fn gateway(&self) -> GatewayBuilder<'_> {
        GatewayBuilder::new(self)
    }
}

/// A running `edgemux serve`, killed on drop; its stderr is printed when the test fails.
pub struct Gateway {
    child: Child,
    dir: PathBuf,
    ca: PathBuf,
    stderr: PathBuf,
    listeners: Vec<u16>,
    admin: Option<u16>,
    /// The cluster peer listener's port, when the config has `[cluster]`.
    peer: Option<u16>,
}

impl Gateway {
    /// Spawns the gateway and reads stdout until `ready`, learning the bound ports.
    pub fn start(env: &TestEnv, config: &Path) -> Gateway {
        Gateway::start_with(env, config, &[])
    }

    /// Like `start`, with global CLI flags before `serve` (e.g. `--log-format json`).
    pub fn start_with(env: &TestEnv, config: &Path, global_args: &[&str]) -> Gateway {
        let stderr = config.with_extension("stderr");
        let mut child = edgemux()
            .args(global_args)
            .arg("serve")
            .arg("-c")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info,edgemux=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).expect("create gateway stderr"))
            .spawn()
            .expect("spawn edgemux serve");
        let stdout = child.stdout.take().expect("gateway stdout");
        let (lines_tx, lines) = mpsc::channel();
        // Keeps draining stdout after `ready` so the gateway never blocks on a full pipe.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let mut gw = Gateway {
            child,
            dir: env.path().to_owned(),
            ca: env.pki.ca.clone(),
            stderr,
            listeners: Vec::new(),
            admin: None,
            peer: None,
        };
        gw.read_ports(&lines);
        gw
    }

    fn read_ports(&mut self, lines: &mpsc::Receiver<String>) {
        let deadline = Instant::now() + SETUP;
        let port_of = |addr: &str| -> u16 {
            let port = addr.strip_prefix("127.0.0.1:").and_then(|p| p.parse().ok());
            port.unwrap_or_else(|| panic!("unexpected address {addr:?} on gateway stdout"))
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("gateway not ready within {SETUP:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!("gateway exited before `ready` ({status:?})");
                }
            };
            match line.split_once(' ') {
                _ if line == "ready" => break,
                Some(("listening", addr)) => self.listeners.push(port_of(addr)),
                Some(("admin", addr)) => self.admin = Some(port_of(addr)),
                Some(("peer", addr)) => self.peer = Some(port_of(addr)),
                _ => panic!("unexpected line on gateway stdout before `ready`: {line:?}"),
            }
        }
        assert!(
            !self.listeners.is_empty(),
            "gateway printed `ready` without a listener"
        );
    }

    /// The first (main) listener's port.
    pub fn port(&self) -> u16 {
        self.listeners[0]
    }

    /// Every listener's port, in config order.
    pub fn ports(&self) -> &[u16] {
        &self.listeners
    }

    /// The gateway process id (for /proc, e.g. its RSS).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the gateway process to exit (after a signal); `None` if it runs on.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        process::poll_until(timeout, || self.child.try_wait().ok().flatten())
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.expect("gateway printed no `admin` line")
    }

    /// The cluster peer listener's port (from the `peer` line a `[cluster]` gateway prints).
    pub fn peer_port(&self) -> u16 {
        self.peer.expect("gateway printed no `peer` line")
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits up to `SETUP` for a log line containing every one of `needles` and returns it.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        self.wait_log_within(SETUP, needles)
    }

    /// `wait_log` for steps slower than setup (an ACME order); panics with the log's tail.
    pub fn wait_log_within(&self, timeout: Duration, needles: &[&str]) -> String {
        let matching = |line: &&str| needles.iter().all(|n| line.contains(n));
        let found = process::poll_until(timeout, || {
            self.stderr().lines().find(matching).map(str::to_owned)
        });
        found.unwrap_or_else(|| {
            let log = self.stderr();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            panic!(
                "no gateway log line with all of {needles:?} within {timeout:?}; last lines:\n{}",
                tail.join("\n")
            )
        })
    }

    /// An ssh client for `key` over `transport`, user name `tester`.
    pub fn ssh(&self, key: &SshKey, transport: Transport) -> SshClient {
        SshClient {
            dir: self.dir.clone(),
            port: self.port(),
            ca: self.ca.clone(),
            key: key.clone(),
            transport,
            user: "tester".to_owned(),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = self.stderr.display();
            eprintln!("--- edgemux serve stderr ({log}) ---\n{}", self.stderr());
        }
    }
}
