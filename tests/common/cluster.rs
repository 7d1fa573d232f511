//! Three `edgemux serve` replicas acting as one (SCALEOUT §9.1, on loopback): a real store for
//! the directory (etcd or Redis by `EDGEMUX_TEST_STORE`, see `store`), one cluster secret, the
//! same certificates, SSH host key and access rules on every
//! replica, and a real HAProxy in front sending PROXY v2, with a round-robin frontend and one
//! frontend pinned to each replica. Replicas take PROXY headers only from 127.0.0.1 (HAProxy);
//! visitors connect from `VISITOR` so the address a backend sees is the visitor's, not the
//! balancer's.
//!
//! Replicas are numbered 1 to 3 (`r1`…`r3`, their `replica_name`). Every port is learned from
//! stdout; a replica restarted after a kill binds the public and admin ports it had, since the
//! balancer's config names them.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::config::{GatewayBuilder, Listener, ProxyProtocol};
use super::haproxy::{self, Haproxy};
use super::http::Visitor;
use super::process::{poll_until, send_signal, Proc};
use super::prom::{Admin, Scrape};
use super::ssh::{KeyKind, SshClient, SshKey, Transport};
use super::store::TestStore;
use super::{edgemux, Gateway, TestEnv, SETUP};

pub const REPLICAS: usize = 3;
/// Where visitors connect from: any 127/8 address is local, and this one is not HAProxy's.
pub const VISITOR: &str = "127.0.0.61";
/// `[cluster] lease_ttl`: the shortest the gateway accepts, so a dead replica's routes expire
/// quickly.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// Clusters running at once in one test process, whatever `--test-threads` says: each is a store,
/// three replicas, HAProxy and their clients, and two of them already fill two cores.
const AT_ONCE: usize = 2;

/// Where a client enters: the round-robin frontend, or the frontend pinned to replica N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Public,
    Replica(usize),
}

/// A place among the `AT_ONCE` clusters allowed to run; given back on drop.
struct Slot;

static RUNNING: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

impl Slot {
    fn take() -> Slot {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= AT_ONCE {
            running = FREED.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        FREED.notify_one();
    }
}

/// What a test adds to replica N's config (access rules, limits); the cluster part is the
/// harness's.
type Configure = Box<dyn Fn(GatewayBuilder) -> GatewayBuilder + Send + Sync>;
/// What a test changes in replica N's config after the harness's cluster part (its peer
/// listener, say).
type ConfigureEach = Box<dyn Fn(usize, GatewayBuilder) -> GatewayBuilder + Send + Sync>;

/// What every replica's config is made from.
struct Recipe {
    endpoint: String,
    secret: PathBuf,
    host_key: PathBuf,
    configure: Configure,
    each: ConfigureEach,
}

impl Recipe {
    /// Writes replica `n`'s config: on port 0 at first, on `ports` (public, admin, peer) for a
    /// restart, as a replica restarted in place keeps its addresses.
    fn write(&self, env: &TestEnv, n: usize, ports: Option<(u16, u16, u16)>) -> PathBuf {
        let bind = |port: Option<u16>| format!("127.0.0.1:{}", port.unwrap_or(0));
        let (public, admin) = (bind(ports.map(|p| p.0)), bind(ports.map(|p| p.1)));
        let peer = bind(ports.map(|p| p.2));
        let certs = env.path().join(format!("r{n}-certs"));
        fs::create_dir_all(&certs).expect("replica certs dir");
        let listener = Listener::bind(&public).proxy_protocol(ProxyProtocol::Required, &["127.0.0.1/32"]);
        // Every replica shows one public port in tunnel URLs, as a fleet behind one balancer
        // does; left to default, each would show the port it bound, and the config hashes
        // (which cover public_port) would differ.
        let builder = (self.configure)(env.gateway())
            .listeners(&[listener])
            .set("public_port", 443)
            .set("tls.certs_dir", certs.display().to_string())
            .set("ssh.host_key", self.host_key.display().to_string())
            .set("admin.bind", admin)
            .set("cluster.name", "test")
            .set("cluster.replica_name", format!("r{n}"))
            .set("cluster.endpoints", vec![self.endpoint.clone()])
            .set("cluster.secret_file", self.secret.display().to_string())
            .set("cluster.lease_ttl", format!("{}s", LEASE_TTL.as_secs()))
            .set("cluster.peer.bind", peer);
        let builder = (self.each)(n, builder);
        let path = env.path().join(format!("r{n}-{}.toml", rand::random::<u32>()));
        fs::write(&path, builder.render()).expect("write replica config");
        path
    }
}

/// A running cluster. Fields drop in order: replicas first (their logs print when a test fails),
/// then the balancer, the store, and the temp dir.
pub struct Cluster {
    replicas: Vec<Option<Gateway>>,
    /// Replicas killed or stopped, kept so their logs print if the test fails.
    gone: Vec<Gateway>,
    pub lb: Haproxy,
    pub store: TestStore,
    /// Each replica's public and admin ports, kept for a restart.
    ports: Vec<(u16, u16, u16)>,
    recipe: Recipe,
    pub env: TestEnv,
    _slot: Slot,
}

impl Cluster {
    /// Starts the store, the three replicas (with `configure` applied to each config) and the
    /// balancer; returns once every replica has found the other two in the directory.
    pub fn start(
        env: TestEnv,
        configure: impl Fn(GatewayBuilder) -> GatewayBuilder + Send + Sync + 'static,
    ) -> Cluster {
        Cluster::start_each(env, configure, |_, c| c)
    }

    /// `start`, with `each(n, config)` applied last to replica `n`'s config.
    pub fn start_each(
        env: TestEnv,
        configure: impl Fn(GatewayBuilder) -> GatewayBuilder + Send + Sync + 'static,
        each: impl Fn(usize, GatewayBuilder) -> GatewayBuilder + Send + Sync + 'static,
    ) -> Cluster {
        let slot = Slot::take();
        let started = Instant::now();
        let store = TestStore::start();
        let recipe = Recipe {
            endpoint: store.endpoint().to_owned(),
            secret: shared_secret(&env),
            host_key: shared_host_key(&env),
            configure: Box::new(configure),
            each: Box::new(each),
        };
        let configs: Vec<PathBuf> = (1..=REPLICAS).map(|n| recipe.write(&env, n, None)).collect();
        let replicas: Vec<Gateway> = thread::scope(|s| {
            let env = &env;
            let starting: Vec<_> = configs
                .iter()
                .map(|config| s.spawn(move || Gateway::start(env, config)))
                .collect();
            starting
                .into_iter()
                .map(|h| h.join().expect("replica start"))
                .collect()
        });
        let ports: Vec<(u16, u16, u16)> = replicas
            .iter()
            .map(|gw| (gw.port(), gw.admin_port(), gw.peer_port()))
            .collect();
        let backends: Vec<haproxy::Replica> = ports
            .iter()
            .map(|&(public, admin, _)| haproxy::Replica { public, admin })
            .collect();
        let lb = Haproxy::cluster(env.path(), &backends);
        let cluster = Cluster {
            replicas: replicas.into_iter().map(Some).collect(),
            gone: Vec::new(),
            lb,
            store,
            ports,
            recipe,
            env,
            _slot: slot,
        };
        for n in 1..=REPLICAS {
            cluster.wait_knows_all(n);
        }
        eprintln!("cluster of {REPLICAS} replicas formed in {:?}", started.elapsed());
        cluster
    }

    /// Replica `n` (1-based); panics if it was killed or stopped.
    pub fn replica(&self, n: usize) -> &Gateway {
        self.replicas[n - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("replica r{n} is not running"))
    }

    pub fn admin(&self, n: usize) -> Admin {
        Admin {
            port: self.ports[n - 1].1,
            token: None,
        }
    }

    pub fn scrape(&self, n: usize) -> Scrape {
        self.admin(n).scrape()
    }

    /// The balancer port for `via`.
    pub fn port(&self, via: Via) -> u16 {
        match via {
            Via::Public => self.lb.port,
            Via::Replica(n) => self.lb.pinned[n - 1],
        }
    }

    /// curl from `VISITOR` through `via`.
    pub fn visitor(&self, via: Via) -> Visitor {
        Visitor::at(&self.env, self.port(via)).with_source(VISITOR)
    }

    /// OpenSSH with `key` through `via` (TLS, sniffed), user `tester`.
    pub fn ssh(&self, key: &SshKey, via: Via) -> SshClient {
        SshClient {
            dir: self.env.path().to_owned(),
            port: self.port(via),
            ca: self.env.pki.ca.clone(),
            key: key.clone(),
            transport: Transport::Tls,
            user: "tester".to_owned(),
        }
    }

    /// A tunnel client that reconnects forever, as users run one (`while :; do ssh -R …; sleep
    /// 0.5; done`): first through `first`, then every time through `then`. `-v` makes ssh log
    /// each `forwarded-tcpip` originator and the server's disconnect message.
    pub fn reconnecting(&self, key: &SshKey, spec: &str, first: Via, then: Via) -> Proc {
        let options = ["-v", "-N", "-R", spec];
        let quoted = |via| shell_words(&self.ssh(key, via).command(&options, &[]));
        let script = format!("{}; while :; do sleep 0.5; {}; done", quoted(first), quoted(then));
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &script]);
        Proc::spawn(self.env.path(), "ssh-R-loop", cmd)
    }

    /// `GET /tunnels` on replica `n`: every tunnel of the cluster, as that replica sees it.
    pub fn tunnels(&self, n: usize) -> Value {
        self.admin(n).tunnels()
    }

    /// The `replicas` list of `host` as replica `n` sees it, as (replica, members) sorted by
    /// name, and its `member_count`; `None` when `n` does not list the host.
    pub fn placement(&self, n: usize, host: &str) -> Option<(Vec<(String, u64)>, u64)> {
        placement(&self.tunnels(n), host)
    }

    /// Waits until every running replica lists `host` with exactly `want` (replica, members).
    pub fn wait_placement(&self, host: &str, want: &[(&str, u64)]) -> Duration {
        let started = Instant::now();
        let want: Vec<(String, u64)> = want.iter().map(|&(r, m)| (r.to_owned(), m)).collect();
        let count: u64 = want.iter().map(|(_, m)| m).sum();
        let running: Vec<usize> = (1..=REPLICAS)
            .filter(|&n| self.replicas[n - 1].is_some())
            .collect();
        let seen = poll_until(SETUP, || {
            let all = running
                .iter()
                .all(|&n| self.placement(n, host) == Some((want.clone(), count)));
            all.then_some(())
        });
        if seen.is_none() {
            let views: Vec<String> = running
                .iter()
                .map(|&n| format!("r{n}: {:?}", self.placement(n, host)))
                .collect();
            panic!("{host} not placed as {want:?} everywhere within {SETUP:?}: {views:?}");
        }
        started.elapsed()
    }

    /// SIGKILL to replica `n`; returns once it is gone.
    pub fn kill(&mut self, n: usize) -> Instant {
        let mut gw = self.replicas[n - 1].take().expect("a running replica to kill");
        send_signal("KILL", &gw.pid().to_string());
        gw.wait_exit(SETUP).expect("a killed replica exits");
        let at = Instant::now();
        self.gone.push(gw);
        at
    }

    /// SIGTERM to replica `n`, which then drains and exits; it counts as running (its admin API
    /// answers during the drain) until `wait_stopped`.
    pub fn terminate(&self, n: usize) {
        send_signal("TERM", &self.replica(n).pid().to_string());
    }

    /// Waits up to `timeout` for replica `n` to exit after `terminate`; returns when it exited
    /// and its status.
    pub fn wait_stopped(&mut self, n: usize, timeout: Duration) -> (Instant, std::process::ExitStatus) {
        let mut gw = self.replicas[n - 1].take().expect("a replica to wait for");
        let status = gw.wait_exit(timeout);
        let at = Instant::now();
        self.gone.push(gw);
        let status = status.unwrap_or_else(|| panic!("r{n} still runs {timeout:?} after SIGTERM"));
        (at, status)
    }

    /// Starts replica `n` again, after `kill` or `wait_stopped`, on the ports it had; returns
    /// once it knows the others.
    pub fn restart(&mut self, n: usize) -> Duration {
        let started = Instant::now();
        assert!(self.replicas[n - 1].is_none(), "r{n} still runs: stop it first");
        let config = self.recipe.write(&self.env, n, Some(self.ports[n - 1]));
        self.replicas[n - 1] = Some(Gateway::start(&self.env, &config));
        self.wait_knows_all(n);
        started.elapsed()
    }

    /// Starts replica `n` again like [`Self::restart`], but returns once it is ready, without
    /// waiting for the store: for a restart while the store is down.
    pub fn restart_alone(&mut self, n: usize) -> Duration {
        let started = Instant::now();
        assert!(self.replicas[n - 1].is_none(), "r{n} still runs: stop it first");
        let config = self.recipe.write(&self.env, n, Some(self.ports[n - 1]));
        self.replicas[n - 1] = Some(Gateway::start(&self.env, &config));
        started.elapsed()
    }

    /// Waits until replica `n`'s directory holds a record for every running replica (itself
    /// included), as `edgemux_cluster_directory_entries` counts them: with no routes yet, that
    /// is the number of running replicas.
    fn wait_knows_all(&self, n: usize) {
        let running = self.replicas.iter().flatten().count() as f64;
        let entries = || self.scrape(n).count("edgemux_cluster_directory_entries", &[]);
        let known = poll_until(SETUP, || (entries() >= running).then_some(()));
        assert!(
            known.is_some(),
            "r{n} sees {} directory entries, wants {running}",
            entries()
        );
    }
}

/// `host`'s `replicas` (sorted) and `member_count` in a `tunnels` answer.
pub fn placement(tunnels: &Value, host: &str) -> Option<(Vec<(String, u64)>, u64)> {
    let list = tunnels["tunnels"].as_array()?;
    let tunnel = list.iter().find(|t| t["host"] == host)?;
    let mut replicas: Vec<(String, u64)> = tunnel["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let name = r["replica"].as_str().unwrap_or("?").to_owned();
                    (name, r["members"].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    replicas.sort();
    Some((replicas, tunnel["member_count"].as_u64().unwrap_or(0)))
}

/// The cluster secret every replica shares, made by `edgemux cluster-secret`, mode 0600.
fn shared_secret(env: &TestEnv) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let out = edgemux()
        .arg("cluster-secret")
        .output()
        .expect("run edgemux cluster-secret");
    assert!(
        out.status.success(),
        "edgemux cluster-secret: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = env.path().join("cluster-secret");
    fs::write(&path, &out.stdout).expect("write the cluster secret");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod the secret");
    path
}

/// One SSH host key for every replica, as a fleet is deployed: a client that lands on another
/// replica meets the same server.
fn shared_host_key(env: &TestEnv) -> PathBuf {
    SshKey::generate(env.path(), "ssh_host_ed25519_key", KeyKind::Ed25519).private
}

/// `cmd` as one line of shell, every word single-quoted.
fn shell_words(cmd: &Command) -> String {
    let quote = |w: &std::ffi::OsStr| format!("'{}'", w.to_string_lossy().replace('\'', r"'\''"));
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}
