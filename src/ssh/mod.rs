//! The embedded SSH tunnel endpoint: public-key auth, `ssh -R` tunnels, `ssh -L` to private
//! tunnels, and a session channel that shows the tunnel URLs.

pub(crate) mod channels;
mod forwards;
mod handler;
pub(crate) mod hostkey;
pub mod keys;
mod options;
mod pump;
mod refusals;
mod session;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey};
use russh::{cipher, compression, kex, mac, ChannelId, MethodKind, MethodSet, Preferred};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, FLOOR_WINDOW};
use crate::config::{Config, Limits, LiveLimits, SshConfig};
use crate::io::ClientAddr;
use crate::names::KeyFingerprint;
use crate::tunnels::{Directory, KeyOwners, Member, Registration, Tunnels};

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
    /// Which full key owns each short key id (host names carry only the short id).
    owners: Arc<KeyOwners>,
    /// Owner → the keys that may reach the owner's private tunnels.
    grants: HashMap<KeyFingerprint, HashSet<KeyFingerprint>>,
    /// Vanity host → the only key that may serve it.
    reserved: HashMap<String, KeyFingerprint>,
    channel_buffer: usize,
    /// What `ssh -L` visitors' own channels lease their windows from.
    budget: Arc<Budget>,
    /// Told about every HTTP tunnel host registered (on-demand certificates).
    pub(crate) on_http_tunnel: Option<HostHook>,
    /// Signs the links `ssh gw link NAME` hands out for private tunnels.
    pub(crate) links: Arc<crate::rules::token::LinkKey>,
    /// The operator's bounds on the rules owners choose.
    access: crate::rules::Policy,
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
        (tunnels, owners): (Arc<Tunnels>, Arc<KeyOwners>),
        (directory, budget): (Arc<dyn Directory>, Arc<Budget>),
        limits: LiveLimits,
    ) -> Self {
        let cfg = &config.ssh;
        let mut grants: HashMap<KeyFingerprint, HashSet<KeyFingerprint>> = HashMap::new();
        for g in &cfg.grants {
            grants.entry(g.owner).or_default().extend(g.keys.iter().copied());
        }
        Self {
            server: Arc::new(server_config(cfg, host_key, &limits.load_full())),
            policy,
            tunnels,
            owners,
            directory,
            domain: config.domain.clone(),
            public_port: config.public_port,
            grants,
            reserved: cfg.reserved.clone(),
            channel_buffer: cfg.channel_buffer,
            budget,
            on_http_tunnel: None,
            links: Arc::new(crate::rules::token::LinkKey::new(&rand::random::<[u8; 32]>())),
            access: access_policy(&config.http),
            limits,
            conn_ids: AtomicU64::new(0),
        }
    }

    /// Whether `visitor` may open channels to `owner`'s tunnels.
    pub(crate) fn may_reach(&self, owner: &KeyFingerprint, visitor: &KeyFingerprint) -> bool {
        may_reach(&self.grants, owner, visitor)
    }

    /// The URL users type for a host: `https://host` plus the port when it is not 443.
    pub(crate) fn url_for(&self, host: &str) -> String {
        crate::names::https_origin(host, self.public_port)
    }
}

/// `[http.access]` and whether `[http.forward_auth]` is set, as the rules' policy.
fn access_policy(http: &crate::config::HttpConfig) -> crate::rules::Policy {
    crate::rules::Policy {
        access: http.access.clone(),
        forward_auth: http.forward_auth.is_some(),
    }
}

/// The owner and the keys granted to it, compared as full keys, never by short id.
fn may_reach(
    grants: &HashMap<KeyFingerprint, HashSet<KeyFingerprint>>,
    owner: &KeyFingerprint,
    visitor: &KeyFingerprint,
) -> bool {
    owner == visitor || grants.get(owner).is_some_and(|g| g.contains(visitor))
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
        preferred: ALGORITHMS,
        ..Default::default()
    }
}

/// What the endpoint offers, most preferred first; `tests/ssh_algorithms.rs` holds it to
/// ssh-audit with no failure and no warning, and every OpenSSH since 6.5 finds a match in each
/// list.
const ALGORITHMS: Preferred = Preferred {
    // Finite-field Diffie-Hellman is left out: russh computes it with num-bigint and a
    // full-length exponent, two 2048..8192-bit modular exponentiations per handshake on the
    // session's task, which any unauthenticated peer can ask for over and over (DHEat,
    // CVE-2002-20001); group14 and group-exchange are weak besides. The NIST curves are left
    // out as ssh-audit fails them. Clients restricted to FIPS algorithms cannot connect.
    kex: Cow::Borrowed(&[
        kex::MLKEM768X25519_SHA256,
        kex::CURVE25519,
        kex::CURVE25519_PRE_RFC_8731,
        // Markers, not algorithms: RFC 8308 extension info and strict kex (Terrapin).
        kex::EXTENSION_SUPPORT_AS_SERVER,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
    ]),
    // Host keys are offered only for the algorithms of the key we hold (Ed25519 unless the
    // operator brings another); the list is also the `server-sig-algs` a client signs its
    // login with. No `ssh-rsa`: SHA-1 (`Handler::auth_publickey*` refuse it for logins).
    key: Cow::Borrowed(&[
        Algorithm::Ed25519,
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP521,
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha256),
        },
    ]),
    host_key_certificates: Cow::Borrowed(&[]),
    // OpenSSH's default ciphers: AEAD first (AES-GCM carries bulk tunnels fastest on AES-NI,
    // see BENCHMARKS.md), CTR only with the encrypt-then-MAC MACs below.
    cipher: Cow::Borrowed(&[
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
        cipher::AES_256_CTR,
        cipher::AES_192_CTR,
        cipher::AES_128_CTR,
    ]),
    // Encrypt-then-MAC only (the AEAD ciphers need none).
    mac: Cow::Borrowed(&[mac::HMAC_SHA256_ETM, mac::HMAC_SHA512_ETM]),
    // No compression at all, not even zlib@openssh.com after login: a zlib compressor and
    // decompressor take some 300 KiB per connection (zlib's defaults) for traffic that is mostly
    // compressed already (HTTP bodies, TLS), and OpenSSH clients do not ask for it unless told to.
    compression: Cow::Borrowed(&[compression::NONE]),
};

/// The read buffer in front of each SSH connection (see `serve`): a few packets' worth, paid
/// once per connection.
const SSH_READ_BUFFER: usize = 8 * 1024;

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
    // russh reads each packet with two exact reads (its length, then the rest): over a plain
    // socket, two syscalls per packet. A small read buffer serves many packets per syscall.
    let stream = tokio::io::BufReader::with_capacity(SSH_READ_BUFFER, stream);
    let start = russh::server::run_stream(ctx.server.clone(), stream, handler);
    let mut session = tokio::time::timeout_at(login_deadline, start)
        .await
        .map_err(|_| SshError::LoginTimeout)??;
    let handle = session.handle();
    let login = tokio::time::sleep_until(login_deadline);
    tokio::pin!(login);
    let (mut login_checked, mut draining, mut told_shutdown) = (false, false, false);
    let mut drain_tick = tokio::time::interval(DRAIN_POLL);
    let mut idle_ticks = 0u32;
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
                // (the drain deadline cuts whatever is left), and only after its channels have
                // stayed closed for a moment: a client still writing its own channel closes
                // when the connection ends would fail on that write before reading the message.
                idle_ticks = if shared.tunnels_idle() { idle_ticks + 1 } else { 0 };
                if idle_ticks >= DRAIN_IDLE_TICKS {
                    told_shutdown = true;
                    disconnect(&handle, "the gateway is shutting down; reconnect to continue").await;
                }
            }
        }
    }
}

/// How often a draining tunnel connection checks whether its last channel has closed.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// Checks in a row with no channel open before a draining client is told to go (500 ms): its
/// own channel-close messages are through by then.
const DRAIN_IDLE_TICKS: u32 = 5;

/// One SSH connection's state, shared by its handler, the task that serves it and the refusal
/// timer; everything else about the connection is derived from it.
#[derive(Debug, Default)]
struct ConnShared {
    authenticated: AtomicBool,
    /// The forwards this connection holds, by the address and port its client asked for;
    /// dropping one deregisters it.
    forwards: Mutex<HashMap<(String, u32), Registration<Member>>>,
    /// Open session channels (the banner, `ssh gw tunnels`), where refusals are shown; each
    /// stays until the client closes it.
    sessions: Mutex<HashMap<ChannelId, SessionStage>>,
    /// The access rules this connection's forwards are served with, once known.
    gate: Arc<crate::rules::Gate>,
}

/// Where a session channel is: each gets one answer (a shell's banner or a command's output),
/// and a shell ends once, so a client repeating requests gets no more output queued for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionStage {
    Opened,
    /// The shell is showing the banner; Ctrl-C ends it.
    Answered,
    /// Closed on our side, waiting for the client's close.
    Closing,
}

impl ConnShared {
    fn forwards(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Registration<Member>>> {
        self.forwards.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, SessionStage>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_whose_short_id_collides_cannot_reach_private_tunnels() {
        let (owner, friend) = (
            KeyFingerprint::from_sha256([1u8; 32]),
            KeyFingerprint::from_sha256([2u8; 32]),
        );
        let grants = HashMap::from([(owner, HashSet::from([friend]))]);
        assert!(may_reach(&grants, &owner, &owner));
        assert!(may_reach(&grants, &owner, &friend));
        assert!(!may_reach(&grants, &owner, &owner.colliding()));
        assert!(!may_reach(&grants, &owner, &friend.colliding()));
    }
}
