//! PROXY protocol peers: a real HAProxy in TCP mode in front of the gateway (`send-proxy` or
//! `send-proxy-v2`) or in front of a cluster's replicas (round robin and pinned frontends, health
//! checks on `/readyz`), and v2 headers written by hand for what HAProxy cannot be made to send
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
    /// The TCP frontend visitors connect to (for a cluster: the round-robin one).
    pub port: u16,
    /// For a cluster: one frontend per replica, in the order the replicas were given.
    pub pinned: Vec<u16>,
    pub proc: Proc,
}

/// A replica behind a cluster's balancer: its main listener and its admin listener, where the
/// health check asks `/readyz`.
#[derive(Clone, Copy, Debug)]
pub struct Replica {
    pub public: u16,
    pub admin: u16,
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

/// `n` distinct ports that were free a moment ago (all held until all are known).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a probe port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("probe port").port())
        .collect()
}

const DEFAULTS: &str = "global\n    noreuseport\n\n\
    defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    \
    timeout server 60s\n\n";

/// Frontend `name` on 127.0.0.1:`port` and the head of its `backend` (its servers follow).
fn frontend(name: &str, port: u16, backend: &str) -> String {
    format!(
        "frontend {name}\n    bind 127.0.0.1:{port}\n    default_backend {backend}\n\n\
         backend {backend}\n"
    )
}

/// The frontend that proves this HAProxy serves: it answers `nonce`.
fn ready_frontend(port: u16, nonce: &str) -> String {
    format!(
        "frontend ready\n    mode http\n    bind 127.0.0.1:{port}\n    \
         http-request return status 200 content-type text/plain string {nonce}\n"
    )
}

fn config(port: u16, gateway_port: u16, send: SendProxy) -> String {
    let mut text = frontend("visitors", port, "edgemux");
    text.push_str(&format!(
        "    server gw 127.0.0.1:{gateway_port} {}\n\n",
        send.keyword()
    ));
    text
}

/// The NLB stand-in for a cluster (SCALEOUT §9.1): frontend `public` round-robins over every
/// replica; frontend `via-rN` reaches replica N only, which is how a test chooses where an ssh
/// client or a visitor lands. Every server gets `send-proxy-v2` and a health check of `/readyz`
/// on its admin port (500 ms apart, down after 2 failures, up after 2 successes). Only the public
/// backend resets the flows of a server marked down (`on-marked-down shutdown-sessions`), as an
/// NLB does with an unhealthy target: a pinned frontend stands for a replica's own address, and
/// its established flows (an owner's SSH connection, a download in flight) must see the
/// replica's drain to its end.
fn cluster_config(ports: &[u16], replicas: &[Replica]) -> String {
    let server = |i: usize, r: &Replica| {
        format!(
            "    server r{} 127.0.0.1:{} send-proxy-v2 check port {} inter 500ms fall 2 rise 2",
            i + 1,
            r.public,
            r.admin
        )
    };
    let mut text = frontend("public", ports[0], "replicas");
    text.push_str("    balance roundrobin\n    option httpchk GET /readyz\n");
    for (i, r) in replicas.iter().enumerate() {
        text.push_str(&format!("{} on-marked-down shutdown-sessions\n", server(i, r)));
    }
    for (i, r) in replicas.iter().enumerate() {
        let n = i + 1;
        text.push_str(&format!(
            "\n{}",
            frontend(&format!("via-r{n}"), ports[n], &format!("only-r{n}"))
        ));
        text.push_str(&format!("    option httpchk GET /readyz\n{}\n", server(i, r)));
    }
    text
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
        Haproxy::launch(dir, 1, |ports| config(ports[0], gateway_port, send))
    }

    /// Starts the balancer of a cluster (see `cluster_config`): `port` is the round-robin
    /// frontend, `pinned[i]` reaches `replicas[i]` only.
    pub fn cluster(dir: &Path, replicas: &[Replica]) -> Haproxy {
        Haproxy::launch(dir, 1 + replicas.len(), |ports| cluster_config(ports, replicas))
    }

    /// Starts a round-robin frontend on the fixed 127.0.0.1:`port` over `publics` (gateway
    /// ports, each sent `send-proxy-v2`), as a CA's validation connections reach a fleet through
    /// its balancer. No health checks; a connection to a server not up yet goes to the next.
    pub fn round_robin_on(dir: &Path, port: u16, publics: &[u16]) -> Haproxy {
        let mut lb = Haproxy::launch(dir, 0, |_| {
            let mut text = frontend("validation", port, "spread");
            text.push_str("    balance roundrobin\n    retries 3\n    option redispatch\n");
            for (i, public) in publics.iter().enumerate() {
                text.push_str(&format!(
                    "    server r{} 127.0.0.1:{public} send-proxy-v2\n",
                    i + 1
                ));
            }
            text.push('\n');
            text
        });
        lb.port = port;
        lb
    }

    /// Starts HAProxy with the config `render` makes for `frontends` free ports (plus the
    /// readiness frontend), retrying on fresh ports when it loses one to another process.
    fn launch(dir: &Path, frontends: usize, render: impl Fn(&[u16]) -> String) -> Haproxy {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let bin = binary();
        let mut lost_races = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let ports = free_ports(frontends + 1);
            let (ready_port, ports) = ports.split_last().expect("at least the ready port");
            let nonce = format!("haproxy-ready-{:016x}", rand::random::<u64>());
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let cfg = dir.join(format!("haproxy-{n}.cfg"));
            let text = format!(
                "{DEFAULTS}{}{}",
                render(ports),
                ready_frontend(*ready_port, &nonce)
            );
            fs::write(&cfg, text).expect("write haproxy config");
            let mut cmd = Command::new(&bin);
            cmd.arg("-db").arg("-f").arg(&cfg);
            let mut proc = Proc::spawn(dir, "haproxy", cmd);
            let outcome = poll_until(SETUP, || match proc.try_wait() {
                Some(status) => Some(Err(status)),
                None => answers(*ready_port, &nonce).then_some(Ok(())),
            });
            match outcome {
                Some(Ok(())) => {
                    return Haproxy {
                        port: ports.first().copied().unwrap_or_default(),
                        pinned: ports.get(1..).unwrap_or_default().to_vec(),
                        proc,
                    }
                }
                Some(Err(_)) if proc.stderr().contains("cannot bind socket") => {
                    lost_races.push(format!("{ports:?}/{ready_port}"));
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
