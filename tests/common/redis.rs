//! A real Redis (Debian's `redis-server`, 7.0) for the cluster tests: one server on a free
//! loopback port, no persistence (`--save "" --appendonly no`), its dir a temp dir, killed on
//! drop. A missing binary fails with the `apt-get install` line; these tests never skip.
//! Readiness is `PING` answered `+PONG`, never a sleep.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::process::{poll_until, Proc};

const INSTALL_HINT: &str = "apt-get install -y redis-server";
/// How long redis-server may take to serve (it is up in milliseconds on an idle machine).
const START: Duration = Duration::from_secs(20);
/// Starts on fresh ports before giving up: each lost race for a port costs one attempt.
const START_ATTEMPTS: usize = 3;
/// One `PING`'s read bound (loopback answers in microseconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The redis-server binary on PATH (or where Debian puts it); panics with the install line.
fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("the cluster tests need redis-server; install it with: {INSTALL_HINT}"))
}

fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    probe.local_addr().expect("probe port").port()
}

/// Sends one inline command and returns the first answer bytes (a short reply).
pub fn command(port: u16, line: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    s.write_all(format!("{line}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn ready(port: u16) -> bool {
    command(port, "PING").is_some_and(|a| a.starts_with("+PONG"))
}

/// One redis-server on loopback.
pub struct Redis {
    /// `redis://127.0.0.1:PORT`, for `[cluster] endpoints`.
    pub endpoint: String,
    pub port: u16,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

enum NotServed {
    PortTaken,
    Failed(String),
}

fn serve_on(port: u16) -> Result<(Proc, tempfile::TempDir), NotServed> {
    let dir = tempfile::Builder::new()
        .prefix("edgemux-redis-")
        .tempdir()
        .expect("redis temp dir");
    let mut cmd = Command::new(binary());
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(dir.path())
        .arg("--daemonize")
        .arg("no");
    let mut proc = Proc::spawn(dir.path(), "redis", cmd);
    let up = poll_until(START, || match proc.try_wait() {
        Some(_) => Some(false),
        None => ready(port).then_some(true),
    });
    match up {
        Some(true) => Ok((proc, dir)),
        Some(false) if format!("{}{}", proc.stdout(), proc.stderr()).contains("Address already in use") => {
            Err(NotServed::PortTaken)
        }
        _ => Err(NotServed::Failed(format!(
            "redis-server did not serve within {START:?}\n{}",
            proc.describe()
        ))),
    }
}

impl Redis {
    /// Starts redis-server and returns once it answers `PING`.
    pub fn start() -> Redis {
        binary();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match serve_on(port) {
                Ok((proc, dir)) => {
                    return Redis {
                        endpoint: format!("redis://127.0.0.1:{port}"),
                        port,
                        proc,
                        _dir: dir,
                    }
                }
                Err(NotServed::PortTaken) => continue,
                Err(NotServed::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("redis-server lost the race for a free port {START_ATTEMPTS} times")
    }

    /// Kills redis-server and starts an empty one on the same port: a store that restarted
    /// without persistence, at the address every replica knows.
    pub fn restart_empty(&mut self) {
        self.proc.kill_only_self();
        let _ = self.proc.wait_exit(START);
        match serve_on(self.port) {
            Ok((proc, dir)) => {
                self.proc = proc;
                self._dir = dir;
            }
            Err(NotServed::PortTaken) => panic!("redis's port {} was taken while it restarted", self.port),
            Err(NotServed::Failed(why)) => panic!("{why}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Sends inline commands on one connection (so `MULTI` … `EXEC` hold) and returns what came
/// back once the last answer arrived (or the read timed out).
pub fn commands(port: u16, lines: &[String]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(PROBE_TIMEOUT)).expect("read timeout");
    let mut all = String::new();
    for line in lines {
        all.push_str(line);
        all.push_str("\r\n");
    }
    all.push_str("QUIT\r\n");
    s.write_all(all.as_bytes()).expect("write to redis");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}
