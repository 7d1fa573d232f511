//! PROXY protocol peers: a real HAProxy in TCP mode in front of the gateway (`send-proxy` or
//! `send-proxy-v2`), and v2 headers written by hand for what HAProxy cannot be made to send
//! (LOCAL, an arbitrary IPv4 or IPv6 source).
//!
//! HAProxy cannot bind port 0, so a start picks free ports and retries with new ones when HAProxy
//! fails to bind (someone took a port in between). Readiness is proven, not guessed: a second
//! frontend answers an HTTP probe with a per-start nonce, so a listener of another process on a
//! reused port is never taken for ours. `noreuseport` keeps two parallel HAProxies from sharing a
//! port through `SO_REUSEPORT`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::process::{poll_until, Proc};
use super::SETUP;

const INSTALL_HINT: &str = "apt-get install -y haproxy";
/// Starts on fresh ports before giving up: each lost race costs one attempt.
const START_ATTEMPTS: usize = 5;
/// One readiness probe's connect and read bound (loopback answers in microseconds).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The PROXY protocol v2 signature (spec §2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Which header HAProxy prepends to each connection it opens to the gateway.
#[derive(Clone, Copy, Debug)]
pub enum SendProxy {
    V1,
    V2,
}

impl SendProxy {
    fn keyword(self) -> &'static str {
        match self {
            SendProxy::V1 => "send-proxy",
            SendProxy::V2 => "send-proxy-v2",
        }
    }
}

/// A running `haproxy -db`, killed on drop (through its `Proc`).
pub struct Haproxy {
    /// The TCP frontend visitors connect to.
    pub port: u16,
    pub proc: Proc,
}

/// The HAProxy binary: `/usr/sbin` is not on every PATH. Panics with the install line: these
/// tests never skip.
fn binary() -> PathBuf {
    let sbin = Path::new("/usr/sbin/haproxy");
    if sbin.is_file() {
        return sbin.to_owned();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("the PROXY protocol tests need HAProxy (haproxy); install it with: {INSTALL_HINT}")
        })
}

/// Two distinct ports that were free a moment ago (both held until both are known).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("probe port").port();
    (port(&a), port(&b))
}

fn config(port: u16, ready_port: u16, gateway_port: u16, send: SendProxy, nonce: &str) -> String {
    format!(
        "global\n    noreuseport\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    \
         timeout server 60s\n\n\
         frontend visitors\n    bind 127.0.0.1:{port}\n    default_backend edgemux\n\n\
         backend edgemux\n    server gw 127.0.0.1:{gateway_port} {}\n\n\
         frontend ready\n    mode http\n    bind 127.0.0.1:{ready_port}\n    \
         http-request return status 200 content-type text/plain string {nonce}\n",
        send.keyword()
    )
}

/// True when `port` answers an HTTP request with `nonce`: our HAProxy is up, every frontend bound.
fn answers(port: u16, nonce: &str) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
    if stream.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).contains(nonce)
}

impl Haproxy {
    /// Starts HAProxy in the foreground with its config in `dir`, forwarding every connection to
    /// `127.0.0.1:gateway_port` with the chosen PROXY header; returns once it serves.
    pub fn start(dir: &Path, gateway_port: u16, send: SendProxy) -> Haproxy {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let bin = binary();
        let mut lost_races = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let (port, ready_port) = free_ports();
            let nonce = format!("haproxy-ready-{:016x}", rand::random::<u64>());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let cfg = dir.join(format!("haproxy-{n}.cfg"));
            let text = config(port, ready_port, gateway_port, send, &nonce);
            fs::write(&cfg, text).expect("write haproxy config");
            let mut cmd = Command::new(&bin);
            cmd.arg("-db").arg("-f").arg(&cfg);
            let mut proc = Proc::spawn(dir, "haproxy", cmd);
            let outcome = poll_until(SETUP, || match proc.try_wait() {
                Some(status) => Some(Err(status)),
                None => answers(ready_port, &nonce).then_some(Ok(())),
            });
            match outcome {
                Some(Ok(())) => return Haproxy { port, proc },
                Some(Err(_)) if proc.stderr().contains("cannot bind socket") => {
                    lost_races.push(format!("{port}/{ready_port}"));
                }
                Some(Err(status)) => {
                    panic!("haproxy exited ({status}) at start\n{}", proc.describe())
                }
                None => panic!("haproxy not serving within {SETUP:?}\n{}", proc.describe()),
            }
        }
        panic!("haproxy could not bind in {START_ATTEMPTS} attempts (ports {lost_races:?})")
    }
}

/// A v2 header with command PROXY over TCP (IPv4 or IPv6, as `source` and `destination` are).
pub fn v2_proxy(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend(s.ip().octets());
            body.extend(d.ip().octets());
            0x11
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            body.extend(s.ip().octets());
            body.extend(d.ip().octets());
            0x21
        }
        _ => panic!("a v2 header's addresses share one family: {source} {destination}"),
    };
    body.extend(source.port().to_be_bytes());
    body.extend(destination.port().to_be_bytes());
    v2(0x21, family, &body)
}

/// A v2 header with command LOCAL and no addresses, as a load balancer's health check sends.
pub fn v2_local() -> Vec<u8> {
    v2(0x20, 0x00, &[])
}

fn v2(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).expect("v2 body fits its 16-bit length");
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([version_command, family]);
    header.extend(len.to_be_bytes());
    header.extend_from_slice(body);
    header
}
