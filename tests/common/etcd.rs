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
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and returns once it is healthy.
    pub fn start() -> Etcd {
        let bin = binary();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("edgemux-etcd-")
                .tempdir()
                .expect("etcd temp dir");
            let (client, peer) = free_ports();
            let (c, p) = (
                format!("http://127.0.0.1:{client}"),
                format!("http://127.0.0.1:{peer}"),
            );
            let mut cmd = Command::new(&bin);
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
                Some(true) => {
                    return Etcd {
                        endpoint: c,
                        proc,
                        _dir: dir,
                    }
                }
                Some(false) if proc.stderr().contains("address already in use") => continue,
                _ => panic!("etcd did not serve within {START:?}\n{}", proc.describe()),
            }
        }
        panic!("etcd lost the race for free ports {START_ATTEMPTS} times")
    }

    /// The process id, for signals (SIGSTOP a store that hangs).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}
