//! A real etcd (Debian's `etcd-server`, 3.4) for the cluster tests: one member on free loopback
//! ports, its data in its own temp dir, killed on drop. A missing binary fails with the
//! `apt-get install` line; these tests never skip.
//!
//! etcd cannot bind port 0 and print what it got, so a start picks two free ports and tries
//! again with new ones when another process took one in between. Readiness is etcd's own
//! `/health` answering `"health":"true"`, never a sleep.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::process::{poll_until, Proc};

const INSTALL_HINT: &str = "apt-get install -y etcd-server";
/// How long etcd may take to serve: a single member elects itself in about a second, but tests
/// start several at once on small machines.
const START: Duration = Duration::from_secs(20);
/// Starts on fresh ports before giving up: each lost race for a port costs one attempt.
const START_ATTEMPTS: usize = 3;
/// One `/health` probe's read bound (loopback answers in microseconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The etcd binary on PATH; panics with the install line when there is none.
fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("the cluster tests need etcd; install it with: {INSTALL_HINT}"))
}

/// Two distinct ports that were free a moment ago (both held until both are known).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("probe port").port();
    (port(&a), port(&b))
}

/// Whether etcd's client port `port` says it is healthy.
fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// One etcd member on loopback.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`, for `[cluster] endpoints`.
    pub endpoint: String,
    pub proc: Proc,
    ports: (u16, u16),
    _dir: tempfile::TempDir,
}

/// Why one start did not serve.
enum NotServed {
    /// Another process took a port in between.
    PortTaken,
    Failed(String),
}

/// Starts etcd with an empty data dir on `client` and `peer` and waits until it is healthy.
fn serve_on(client: u16, peer: u16) -> Result<(Proc, tempfile::TempDir), NotServed> {
    let dir = tempfile::Builder::new()
        .prefix("edgemux-etcd-")
        .tempdir()
        .expect("etcd temp dir");
    let (c, p) = (
        format!("http://127.0.0.1:{client}"),
        format!("http://127.0.0.1:{peer}"),
    );
    let mut cmd = Command::new(binary());
    cmd.arg("--name=default")
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client-urls={c}"))
        .arg(format!("--advertise-client-urls={c}"))
        .arg(format!("--listen-peer-urls={p}"))
        .arg(format!("--initial-advertise-peer-urls={p}"))
        .arg(format!("--initial-cluster=default={p}"));
    let mut proc = Proc::spawn(dir.path(), "etcd", cmd);
    let up = poll_until(START, || match proc.try_wait() {
        Some(_) => Some(false),
        None => healthy(client).then_some(true),
    });
    match up {
        Some(true) => Ok((proc, dir)),
        Some(false) if proc.stderr().contains("address already in use") => Err(NotServed::PortTaken),
        _ => Err(NotServed::Failed(format!(
            "etcd did not serve within {START:?}\n{}",
            proc.describe()
        ))),
    }
}

impl Etcd {
    /// Starts etcd and returns once it is healthy.
    pub fn start() -> Etcd {
        binary();
        for _ in 0..START_ATTEMPTS {
            let (client, peer) = free_ports();
            match serve_on(client, peer) {
                Ok((proc, dir)) => {
                    return Etcd {
                        endpoint: format!("http://127.0.0.1:{client}"),
                        proc,
                        ports: (client, peer),
                        _dir: dir,
                    }
                }
                Err(NotServed::PortTaken) => continue,
                Err(NotServed::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("etcd lost the race for free ports {START_ATTEMPTS} times")
    }

    /// Kills etcd and starts a new one on the same ports with an empty data dir: a store wiped
    /// or rebuilt from nothing, at the address every replica knows.
    pub fn restart_empty(&mut self) {
        self.proc.kill_only_self();
        let _ = self.proc.wait_exit(START);
        let (client, peer) = self.ports;
        match serve_on(client, peer) {
            Ok((proc, dir)) => {
                self.proc = proc;
                self._dir = dir;
            }
            Err(NotServed::PortTaken) => panic!("etcd's port {client} was taken while it restarted"),
            Err(NotServed::Failed(why)) => panic!("{why}"),
        }
    }

    /// The process id, for signals (SIGSTOP a store that hangs).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
