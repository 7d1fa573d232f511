//! This replica's part in the cluster, started by the gateway when `[cluster]` is present: the
//! directory in the store (published from the registry, read into the cluster [`Directory`]), and
//! the peer link's two ends. Stopped cleanly on SIGTERM: marked draining, then the lease revoked.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::directory::ClusterDirectory;
use super::drift::{drifted, Told};
use super::fence::{decide, wants_answers, Answers, Decision, Inputs};
use super::listing::{self, Listed};
use super::owner::OwnerSide;
use super::peer::codec::{Op, PeerRequest};
use super::peer::link::client::PeerClient;
use super::peer::link::server::PeerServer;
use super::peer::secret::{ClusterSecret, Label, SecretError};
use super::peer::tls::PeerTls;
use super::store::{Lookup, ReplicaId, Store, StoreError};
use super::Killed;
use crate::acme::shared::SharedStore;
use crate::acme::SharedAcme;
use crate::config::ClusterConfig;
use crate::names::KeyFingerprint;
use crate::tunnels::{Directory, Tunnels};

/// Peer streams one replica serves at once: each holds a channel on a tunnel client, which
/// `limits.channels_per_tunnel` bounds per member again.
const MAX_PEER_STREAMS: usize = 16_384;

/// The fence watch looks at the store's health this often, and asks the peers at most this
/// often while it wants their answers (each round takes at most twice the connect timeout).
/// Under the state directory (`certs_dir`): the other replicas' peer addresses, as last seen.
const PEERS_FILE: &str = "cluster-peers";
const FENCE_CHECK: Duration = Duration::from_secs(1);
/// Peers pinged in one round: the fleet, bounded as the lookups are.
const MAX_PINGS: usize = 16;
/// A ping names a host, as every peer request does; nobody serves this one.
const PING_HOST: &str = "ping.edgemux.invalid";
/// What a fenced replica's SSH clients are told; their reconnect loop re-homes them through the
/// load balancer, which no longer sends flows here (`/readyz` is 503).
const FENCE_MESSAGE: &str = "this replica lost its cluster store; reconnect to continue";

/// Why the cluster part could not start; each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.secret_file: {0}")]
    Secret(#[from] SecretError),
    #[error("cluster store: {0}")]
    Store(#[from] StoreError),
    #[error("cluster peer TLS: {0}")]
    PeerTls(String),
}

/// Retires the cluster directory's handles of replicas that drain or leave, on every change of
/// the store's copy, until the directory is gone.
async fn retire_stale(
    directory: std::sync::Weak<ClusterDirectory>,
    mut changes: tokio::sync::watch::Receiver<u64>,
) {
    while changes.changed().await.is_ok() {
        let Some(directory) = directory.upgrade() else {
            return;
        };
        directory.retire_stale();
        directory.report_peers();
    }
}

/// Remembers the other replicas' peer addresses in `path` whenever they change while the store
/// serves this replica, until `stop`: a restart with the store down asks them (`listing`).
/// `saved`: what the file holds now (read at start).
async fn remember_peers(
    lookup: Lookup,
    (path, mut saved): (PathBuf, Vec<SocketAddr>),
    stop: CancellationToken,
) {
    let mut changes = lookup.changes();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        if !lookup.store_up() {
            continue;
        }
        let mut addrs: Vec<SocketAddr> = lookup.replicas().into_iter().map(|(_, r)| r.peer_addr).collect();
        addrs.sort_unstable();
        addrs.dedup();
        if addrs != saved {
            match listing::save_seeds(&path, &addrs) {
                Ok(()) => saved = addrs,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remember the peer addresses")
                }
            }
        }
    }
}

/// Compares this replica's config hash with every other replica's, on every change of the
/// store's copy, until `stop`: sets `edgemux_cluster_config_mismatch` and logs each difference
/// once, naming the replica.
async fn watch_drift(
    lookup: Lookup,
    mut changes: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let mut told = Told::default();
    let mut mismatch = false;
    loop {
        let ours = lookup.config_hash();
        let now = drifted(&ours, &lookup.replicas());
        for d in told.news(&ours, &now) {
            tracing::warn!(
                replica = %d.replica,
                config_hash = %d.theirs,
                ours = %ours,
                "another replica's config hash differs from this replica's: domain, public_port, \
                 authorized keys, grants, reserves, spread or routing limits differ"
            );
        }
        if mismatch && now.is_empty() {
            tracing::info!(config_hash = %ours, "every replica's config hash agrees again");
        }
        mismatch = !now.is_empty();
        crate::metrics::cluster_config_mismatch(mismatch);
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// What the fence watch needs: the store's health and the peers from the copy, a client to ping
/// them, the tunnels to close, and the flag `/readyz` reads.
struct FenceWatch {
    lookup: Lookup,
    client: Arc<PeerClient>,
    connect_timeout: Duration,
    destination: SocketAddr,
    fence_after: Option<Duration>,
    tunnels: Arc<Tunnels>,
    fenced: Arc<AtomicBool>,
}

impl FenceWatch {
    /// Until `stop`: measures how long the store has not served this replica, asks the peers
    /// once that is past `fence_after`, and applies [`decide`] (`cluster::fence`).
    async fn run(self, stop: CancellationToken) {
        let mut down_since: Option<Instant> = None;
        let mut heard_up = false;
        let mut ticks = tokio::time::interval(FENCE_CHECK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let now = Instant::now();
            down_since = if self.lookup.store_up() {
                None
            } else {
                Some(down_since.unwrap_or(now))
            };
            let store_down_for = down_since.map(|since| now.duration_since(since));
            let fenced = self.fenced.load(Ordering::Acquire);
            let answers = if wants_answers(store_down_for, self.fence_after, fenced) {
                Some(self.ping_peers().await)
            } else {
                None
            };
            let inputs = Inputs {
                store_down_for,
                fence_after: self.fence_after,
                answers,
                heard_up_before: heard_up,
                fenced,
            };
            heard_up = store_down_for.is_some() && answers.is_some_and(|a| a.up > 0);
            match decide(inputs) {
                Decision::Fence => {
                    tracing::warn!(
                        down_for = ?store_down_for,
                        ?answers,
                        "fenced: the cluster store does not serve this replica while another \
                         replica's does; /readyz answers 503 and SSH clients are told to reconnect"
                    );
                    self.fenced.store(true, Ordering::Release);
                    crate::metrics::cluster_fenced(true);
                    self.disconnect_all();
                }
                Decision::Unfence => {
                    tracing::info!("un-fenced: the cluster store serves this replica again");
                    self.fenced.store(false, Ordering::Release);
                    crate::metrics::cluster_fenced(false);
                }
                // Connections that came while fenced are sent away too: tunnels are not served
                // from a fenced replica.
                Decision::Stay if fenced => self.disconnect_all(),
                Decision::Stay => {}
            }
        }
    }

    /// Pings the other replicas in the copy, all at once, each within twice the connect timeout.
    async fn ping_peers(&self) -> Answers {
        let mut pings = tokio::task::JoinSet::new();
        let bound = self.connect_timeout * 2;
        for (rid, record) in self.lookup.replicas().into_iter().take(MAX_PINGS) {
            let client = self.client.clone();
            let req = PeerRequest::dial(Op::Ping, PING_HOST, 0, self.destination, self.destination);
            pings.spawn(async move {
                let req = req.ok()?;
                let asked = client.command(record.peer_addr, rid.as_str(), req);
                tokio::time::timeout(bound, asked).await.ok()?.ok()
            });
        }
        let mut answers = Answers::default();
        while let Some(done) = pings.join_next().await {
            match done.ok().flatten().as_deref() {
                Some("store=up") => answers.up += 1,
                Some("store=down") => answers.down += 1,
                _ => answers.silent += 1,
            }
        }
        crate::metrics::cluster_fence_answers("up", answers.up);
        crate::metrics::cluster_fence_answers("down", answers.down);
        crate::metrics::cluster_fence_answers("silent", answers.silent);
        answers
    }

    /// Tells every SSH connection that serves a tunnel here to reconnect.
    fn disconnect_all(&self) {
        let mut told = std::collections::HashSet::new();
        for member in self
            .tunnels
            .snapshot()
            .into_iter()
            .flat_map(|(_, members)| members)
        {
            if told.insert(member.conn) {
                tracing::info!(conn = member.conn, "fenced: tunnel client told to reconnect");
                tokio::spawn(async move { crate::ssh::disconnect(&member.handle, FENCE_MESSAGE).await });
            }
        }
    }
}

/// This replica in the cluster.
pub(crate) struct Cluster {
    store: tokio::sync::Mutex<Option<Store>>,
    lookup: Lookup,
    server: Arc<PeerServer>,
    me: ReplicaId,
    /// For the admin API's kills on other replicas.
    client: Arc<PeerClient>,
    destination: SocketAddr,
    /// Set while fenced (`cluster::fence`): `/readyz` answers 503.
    fenced: Arc<AtomicBool>,
    /// The ACME state in the store, and the key that seals private keys there.
    acme: (Arc<dyn SharedStore>, [u8; 32]),
    /// Ends the drift and fence watches with the cluster part.
    _watches: DropGuard,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("lookup", &self.lookup)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts the directory tasks and builds both ends of the peer link. Returns the directory
    /// the HTTP proxy and `ssh -L` use: `local`'s members, then other replicas'. `config_hash`
    /// is published in the replica record and compared with the others'; `state_dir` keeps the
    /// other replicas' addresses for a start with the store down. Must be called within
    /// a Tokio runtime.
    pub(crate) fn start(
        cfg: &ClusterConfig,
        (tunnels, local): (&Arc<Tunnels>, Arc<dyn Directory>),
        reserved: HashMap<String, KeyFingerprint>,
        (open_timeout, public_port): (Duration, u16),
        (config_hash, state_dir): (String, &Path),
    ) -> Result<(Self, Arc<dyn Directory>), ClusterError> {
        let secret = ClusterSecret::load(&cfg.secret_file)?;
        crate::metrics::zero_peer_streams();
        let reserved = move |host: &str, key: &KeyFingerprint| reserved.get(host) == Some(key);
        let store = Store::start(cfg, tunnels.clone(), reserved, config_hash)?;
        let marker = store.marker();
        let acme = (store.acme(), secret.derive(Label::Seal));
        tunnels.set_observer(Box::new(move |key| marker.mark(&key.host)));
        let rid = store.rid().clone();
        let tls = match &cfg.peer_tls {
            Some(files) => PeerTls::from_files(files, rid.as_str()),
            None => PeerTls::derived(&secret, rid.as_str()),
        };
        let tls = tls.map_err(|e| ClusterError::PeerTls(e.to_string()))?;
        // One dialer for streams, lookups, kills and pings: one warm pool per peer.
        let client = Arc::new(PeerClient::new(
            &tls,
            &secret,
            cfg.peer_connect_timeout,
            open_timeout,
        ));
        let me = rid.clone();
        let lookup = store.lookup();
        let store_up = {
            let lookup = lookup.clone();
            Box::new(move || lookup.store_up())
        };
        let owner = OwnerSide::new((tunnels.clone(), local.clone()), open_timeout, store_up);
        let server = Arc::new(PeerServer::new(&tls, &secret, Arc::new(owner), open_timeout));
        let peers = (client.clone(), cfg.peer_connect_timeout);
        let seeds_file = state_dir.join(PEERS_FILE);
        let seeds = listing::load_seeds(&seeds_file);
        let listed = Arc::new(Listed::new(cfg.peer_advertise, seeds.clone()));
        let spread = (cfg.spread, listed.clone());
        let directory = ClusterDirectory::new(local, (lookup.clone(), rid), peers, spread, public_port);
        let directory = Arc::new(directory);
        tokio::spawn(retire_stale(Arc::downgrade(&directory), lookup.changes()));
        let watches = CancellationToken::new();
        tokio::spawn(watch_drift(lookup.clone(), lookup.changes(), watches.clone()));
        let destination = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), public_port);
        let fenced = Arc::new(AtomicBool::new(false));
        crate::metrics::cluster_fenced(false);
        let fence = FenceWatch {
            lookup: lookup.clone(),
            client: client.clone(),
            connect_timeout: cfg.peer_connect_timeout,
            destination,
            fence_after: cfg.fence_after,
            tunnels: tunnels.clone(),
            fenced: fenced.clone(),
        };
        tokio::spawn(fence.run(watches.clone()));
        let listing = (client.clone(), destination);
        tokio::spawn(listed.clone().poll(lookup.clone(), listing, watches.clone()));
        tokio::spawn(remember_peers(
            lookup.clone(),
            (seeds_file, seeds),
            watches.clone(),
        ));
        let cluster = Self {
            store: tokio::sync::Mutex::new(Some(store)),
            lookup,
            server,
            me,
            client,
            destination,
            fenced,
            acme,
            _watches: watches.drop_guard(),
        };
        Ok((cluster, directory))
    }

    /// Serves the peer listener until `shutdown`; streams are followed by `tracker`, so a drain
    /// waits for them.
    pub(crate) fn serve_peers(&self, listener: TcpListener, tasks: (CancellationToken, TaskTracker)) {
        let slots = Arc::new(Semaphore::new(MAX_PEER_STREAMS));
        tokio::spawn(self.server.clone().run(listener, slots, tasks));
    }

    /// Asks every other replica that serves `host` to close its connections serving it, all at
    /// once, each bounded by the peer timeouts.
    pub(crate) async fn kill_elsewhere(&self, host: &str) -> Vec<Killed> {
        let mut asks = tokio::task::JoinSet::new();
        for (rid, _) in self.lookup.routes(host) {
            if rid == self.me {
                continue;
            }
            let replica = rid.replica_name().to_owned();
            let Some(record) = self.lookup.replica(&rid) else {
                continue;
            };
            let visitor = self.destination;
            let req = PeerRequest::dial(Op::Kill, host, 0, visitor, self.destination);
            let client = self.client.clone();
            asks.spawn(async move {
                let result = match req {
                    Ok(req) => client
                        .command(record.peer_addr, rid.as_str(), req)
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|n| n.parse().map_err(|_| format!("unexpected answer {n:?}"))),
                    Err(e) => Err(e.to_string()),
                };
                Killed { replica, result }
            });
        }
        let mut out = Vec::new();
        while let Some(done) = asks.join_next().await {
            out.extend(done.ok());
        }
        out.sort_by(|a, b| a.replica.cmp(&b.replica));
        out
    }

    /// What the ACME client shares with the other replicas (SCALEOUT §7).
    pub(crate) fn shared_acme(&self) -> SharedAcme {
        SharedAcme {
            store: self.acme.0.clone(),
            seal_key: self.acme.1,
        }
    }

    /// Whether this replica fenced itself (`cluster::fence`): `/readyz` answers 503.
    pub(crate) fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// SIGTERM: other replicas put this one last in their pools from now on.
    pub(crate) async fn set_draining(&self) {
        if let Some(store) = self.store.lock().await.as_ref() {
            if !store.set_draining().await {
                tracing::warn!("the cluster store was not told that this replica drains");
            }
        }
    }

    /// After SIGHUP: publish the config hash of what is in force now (written even when it did
    /// not change, so a reload also repairs a record the store missed).
    /// The config hash this replica publishes now.
    pub(crate) fn config_hash(&self) -> String {
        self.lookup.config_hash()
    }

    pub(crate) async fn set_config_hash(&self, hash: String) {
        if self.lookup.config_hash() != hash {
            tracing::info!(config_hash = %hash, "this replica's config hash changed");
        }
        if let Some(store) = self.store.lock().await.as_ref() {
            if !store.set_config_hash(hash).await {
                tracing::warn!("the cluster store was not told this replica's new config hash");
            }
        }
    }

    /// After the drain: revoke the lease, so this replica's routes leave every cache at once.
    pub(crate) async fn stop(&self) {
        if let Some(store) = self.store.lock().await.take() {
            store.stop().await;
        }
    }
}
