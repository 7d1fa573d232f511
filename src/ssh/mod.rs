//! The embedded SSH tunnel endpoint: public-key auth, `ssh -R` tunnels, `ssh -L` to private
//! tunnels, and a session channel that shows the tunnel URLs.

pub(crate) mod channels;
mod handler;
pub(crate) mod hostkey;
pub mod keys;
mod pump;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::{ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, FLOOR_WINDOW};
use crate::config::{Config, Limits, LiveLimits, SshConfig};
use crate::io::ClientAddr;
use crate::tunnels::{Directory, Member, Registration, Tunnels};

pub(crate) use keys::KeyPolicy;

/// Largest SSH packet we send or accept per channel; OpenSSH's own default is 32 KiB.
const MAX_PACKET: u32 = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SshError {
    #[error("ssh protocol: {0}")]
    Protocol(#[from] russh::Error),
    #[error("not authenticated within limits.login_timeout")]
    LoginTimeout,
}

impl SshError {
    /// The client went away (TCP close, TLS without close_notify as `openssl s_client` does).
    pub(crate) fn is_disconnect(&self) -> bool {
        match self {
            Self::Protocol(russh::Error::IO(e)) => matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ),
            Self::Protocol(russh::Error::Disconnect | russh::Error::HUP) => true,
            Self::Protocol(_) | Self::LoginTimeout => false,
        }
    }
}

/// A callback told about a host (on-demand certificates for new HTTP tunnels).
pub(crate) type HostHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Everything the SSH side shares between connections.
pub(crate) struct SshContext {
    server: Arc<russh::server::Config>,
    pub(crate) policy: KeyPolicy,
    /// Where this endpoint registers the tunnels its clients open.
    tunnels: Arc<Tunnels>,
    /// Where `ssh -L` finds the tunnels it reaches.
    directory: Arc<dyn Directory>,
    domain: String,
    public_port: u16,
    /// owner key id → key ids that may reach the owner's private tunnels.
    grants: HashMap<String, HashSet<String>>,
    /// Vanity host → the only key id that may serve it.
    reserved: HashMap<String, String>,
    channel_buffer: usize,
    /// What `ssh -L` visitors' own channels lease their windows from.
    budget: Arc<Budget>,
    /// Told about every HTTP tunnel host registered (on-demand certificates).
    pub(crate) on_http_tunnel: Option<HostHook>,
    limits: LiveLimits,
    conn_ids: AtomicU64,
}

impl std::fmt::Debug for SshContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshContext")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl SshContext {
    pub(crate) fn new(
        config: &Config,
        (host_key, policy): (PrivateKey, KeyPolicy),
        tunnels: Arc<Tunnels>,
        (directory, budget): (Arc<dyn Directory>, Arc<Budget>),
        limits: LiveLimits,
    ) -> Self {
        let cfg = &config.ssh;
        let mut grants: HashMap<String, HashSet<String>> = HashMap::new();
        for g in &cfg.grants {
            grants
                .entry(g.owner.clone())
                .or_default()
                .extend(g.keys.iter().cloned());
        }
        Self {
            server: Arc::new(server_config(cfg, host_key, &limits.load_full())),
            policy,
            tunnels,
            directory,
            domain: config.domain.clone(),
            public_port: config.public_port,
            grants,
            reserved: cfg.reserved.clone(),
            channel_buffer: cfg.channel_buffer,
            budget,
            on_http_tunnel: None,
            limits,
            conn_ids: AtomicU64::new(0),
        }
    }

    /// Whether `visitor` may open channels to `owner`'s private tunnels.
    pub(crate) fn may_reach(&self, owner: &str, visitor: &str) -> bool {
        owner == visitor || self.grants.get(owner).is_some_and(|g| g.contains(visitor))
    }

    /// The URL users type for a host: `https://host` plus the port when it is not 443.
    pub(crate) fn url_for(&self, host: &str) -> String {
        crate::names::https_origin(host, self.public_port)
    }
}

fn server_config(cfg: &SshConfig, host_key: PrivateKey, limits: &Limits) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard(concat!("SSH-2.0-edgemux_", env!("CARGO_PKG_VERSION")).into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(500),
        // OpenSSH probes with "none" first; answering it at once is not an oracle.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        // Where every channel's window starts (ssh::pump grows it as its reader keeps up).
        window_size: FLOOR_WINDOW as u32,
        maximum_packet_size: MAX_PACKET,
        max_auth_attempts: limits.ssh_auth_attempts,
        // Dead clients are found by keepalives, not by the 10-minute inactivity default.
        inactivity_timeout: None,
        keepalive_interval: Some(cfg.keepalive_interval),
        keepalive_max: cfg.keepalive_max,
        nodelay: true,
        ..Default::default()
    }
}

/// Runs one SSH connection to completion on an already-routed stream.
///
/// A client that has not authenticated within `limits.login_timeout` is disconnected, and on
/// shutdown every client is told so (OpenSSH prints it; `ssh` with keepalives reconnects).
pub(crate) async fn serve<S>(
    ctx: Arc<SshContext>,
    stream: S,
    client: ClientAddr,
    shutdown: CancellationToken,
) -> Result<(), SshError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = ctx.conn_ids.fetch_add(1, Ordering::Relaxed) + 1;
    let shared = Arc::new(ConnShared::default());
    let handler = handler::Handler::new(ctx.clone(), conn, client.clone(), shared.clone());
    let client = client.client;
    let login_deadline = tokio::time::Instant::now() + ctx.limits.load_full().login_timeout;
    let start = russh::server::run_stream(ctx.server.clone(), stream, handler);
    let mut session = tokio::time::timeout_at(login_deadline, start)
        .await
        .map_err(|_| SshError::LoginTimeout)??;
    let handle = session.handle();
    let login = tokio::time::sleep_until(login_deadline);
    tokio::pin!(login);
    let (mut login_checked, mut draining, mut told_shutdown) = (false, false, false);
    let mut drain_tick = tokio::time::interval(DRAIN_POLL);
    loop {
        tokio::select! {
            r = &mut session => return Ok(r?),
            () = &mut login, if !login_checked => {
                login_checked = true;
                if !shared.authenticated.load(Ordering::Acquire) {
                    tracing::info!(conn, %client, "ssh login timed out");
                    disconnect(&handle, "authentication timed out").await;
                    return Err(SshError::LoginTimeout);
                }
            }
            () = shutdown.cancelled(), if !draining => draining = true,
            _ = drain_tick.tick(), if draining && !told_shutdown => {
                // A tunnel client still carrying requests is told only once they are done
                // (the drain deadline cuts whatever is left).
                if shared.tunnels_idle() {
                    told_shutdown = true;
                    disconnect(&handle, "the gateway is shutting down; reconnect to continue").await;
                }
            }
        }
    }
}

/// How often a draining tunnel connection checks whether its last channel has closed.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// One SSH connection's state, shared by its handler, the task that serves it and the refusal
/// timer; everything else about the connection is derived from it.
#[derive(Debug, Default)]
struct ConnShared {
    authenticated: AtomicBool,
    /// The forwards this connection holds, by the address and port its client asked for;
    /// dropping one deregisters it.
    forwards: Mutex<HashMap<(String, u32), Registration<Member>>>,
    /// Open session channels (the banner, `ssh gw tunnels`), where refusals are shown.
    sessions: Mutex<HashSet<ChannelId>>,
}

impl ConnShared {
    fn forwards(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Registration<Member>>> {
        self.forwards.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashSet<ChannelId>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no channel into this connection's tunnels is open any more.
    fn tunnels_idle(&self) -> bool {
        self.forwards()
            .values()
            .all(|reg| reg.member().stats.open_channels.load(Ordering::Acquire) == 0)
    }
}

/// Tells an SSH client why it is disconnected (OpenSSH prints the message), the one way this
/// endpoint ends a client's connection.
pub(crate) async fn disconnect(handle: &russh::server::Handle, why: &str) {
    let _ = handle
        .disconnect(
            russh::Disconnect::ByApplication,
            format!("edgemux: {why}"),
            String::new(),
        )
        .await;
}
