//! The embedded SSH tunnel endpoint: public-key auth, `ssh -R` tunnels, `ssh -L` to private
//! tunnels, and a session channel that shows the tunnel URLs.

pub mod channels;
pub mod handler;
pub mod hostkey;
pub mod keys;
pub mod names;
pub mod pump;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::{MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::{Limits, LiveLimits, SshConfig};
use crate::tunnels::Tunnels;

pub use keys::KeyPolicy;

/// SSH flow-control window: at least 8 MiB so one channel fills a long fat link
/// (100 ms × 640 Mbit/s).
pub const WINDOW_SIZE: u32 = 8 * 1024 * 1024;
/// Largest SSH packet we send or accept per channel; OpenSSH's own default is 32 KiB.
const MAX_PACKET: u32 = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh protocol: {0}")]
    Protocol(#[from] russh::Error),
    #[error("not authenticated within limits.login_timeout")]
    LoginTimeout,
}

impl SshError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Protocol(_) => "protocol",
            Self::LoginTimeout => "login_timeout",
        }
    }

    /// The client went away (TCP close, TLS without close_notify as `openssl s_client` does).
    pub fn is_disconnect(&self) -> bool {
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
pub type HostHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Everything the SSH side shares between connections.
pub struct SshContext {
    pub server: Arc<russh::server::Config>,
    pub policy: KeyPolicy,
    pub tunnels: Arc<Tunnels>,
    pub domain: String,
    pub public_port: u16,
    /// owner key id → key ids that may reach the owner's private tunnels.
    pub grants: HashMap<String, HashSet<String>>,
    /// Vanity host → the only key id that may serve it.
    pub reserved: HashMap<String, String>,
    pub channel_buffer: usize,
    /// Told about every HTTP tunnel host registered (on-demand certificates).
    pub on_http_tunnel: Option<HostHook>,
    pub limits: LiveLimits,
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
    pub fn new(
        cfg: &SshConfig,
        host_key: PrivateKey,
        policy: KeyPolicy,
        tunnels: Arc<Tunnels>,
        domain: String,
        public_port: u16,
        limits: LiveLimits,
    ) -> Self {
        let mut grants: HashMap<String, HashSet<String>> = HashMap::new();
        for g in &cfg.grants {
            grants
                .entry(g.owner.clone())
                .or_default()
                .extend(g.keys.iter().cloned());
        }
        Self {
            server: Arc::new(server_config(cfg, host_key, &limits.get())),
            policy,
            tunnels,
            domain,
            public_port,
            grants,
            reserved: cfg.reserved.clone(),
            channel_buffer: cfg.channel_buffer,
            on_http_tunnel: None,
            limits,
            conn_ids: AtomicU64::new(0),
        }
    }

    /// Whether `visitor` may open channels to `owner`'s private tunnels.
    pub fn may_reach(&self, owner: &str, visitor: &str) -> bool {
        owner == visitor || self.grants.get(owner).is_some_and(|g| g.contains(visitor))
    }

    /// The URL users type for a host: `https://host` plus the port when it is not 443.
    pub fn url_for(&self, host: &str) -> String {
        crate::http::https_origin(host, self.public_port)
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
        window_size: WINDOW_SIZE,
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
pub async fn serve<S>(
    ctx: Arc<SshContext>,
    stream: S,
    (client, vpce): (SocketAddr, Option<String>),
    shutdown: CancellationToken,
) -> Result<(), SshError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = ctx.conn_ids.fetch_add(1, Ordering::Relaxed) + 1;
    let shared = Arc::new(ConnShared::default());
    let handler = handler::Handler::new(ctx.clone(), conn, (client, vpce), shared.clone());
    let login_deadline = tokio::time::Instant::now() + ctx.limits.get().login_timeout;
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

/// What one SSH connection's handler shares with the task that serves it.
#[derive(Debug, Default)]
pub struct ConnShared {
    pub authenticated: AtomicBool,
    /// The pool members this connection registered.
    pub members: std::sync::Mutex<Vec<Arc<crate::tunnels::Member>>>,
}

impl ConnShared {
    /// Drops kept-alive upstream connections and says whether no channel is open any more.
    fn tunnels_idle(&self) -> bool {
        let members = self.members.lock().unwrap_or_else(|p| p.into_inner());
        members.iter().for_each(|m| m.idle.clear());
        members
            .iter()
            .all(|m| m.stats.open_channels.load(Ordering::Acquire) == 0)
    }
}

async fn disconnect(handle: &russh::server::Handle, why: &str) {
    let _ = handle
        .disconnect(
            russh::Disconnect::ByApplication,
            format!("edgemux: {why}"),
            String::new(),
        )
        .await;
}
