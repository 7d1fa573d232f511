//! Upstream connections: HTTP/1.1 over `forwarded-tcpip` channels to the members of a tunnel's
//! pool, kept alive per member and reused once their previous response has been read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::ssh::channels::open_channel;
use crate::ssh::pump::channel_io;
use crate::tunnels::Member;

pub type Sender = SendRequest<Incoming>;

/// Idle keep-alive connections a member keeps; more are closed when released.
const MAX_IDLE_PER_MEMBER: usize = 16;

/// A member's idle upstream connections, dropped (and closed) with the member.
#[derive(Default)]
pub struct IdleConns(Mutex<Vec<Sender>>);

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdleConns")
    }
}

impl IdleConns {
    fn take(&self) -> Option<Sender> {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(s) = idle.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// Closes every kept-alive connection (shutdown: they would hold their channels open).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn put(&self, s: Sender) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_MEMBER {
            idle.push(s);
        }
    }
}

/// How upstream channels are opened.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// Time a tunnel client gets to accept a channel before the next member is tried.
    pub open_timeout: Duration,
    /// Bytes a channel buffers for a slow reader (`ssh.channel_buffer`).
    pub buffer: usize,
    /// `limits.channels_per_tunnel`.
    pub max_channels: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no tunnel client accepted a channel")]
    Unavailable,
}

/// A ready connection to the first member that can serve: a kept-alive one, or a new channel.
/// Members that refuse or time out opening a channel are skipped; nothing was sent to them.
pub async fn connect(
    members: &[Arc<Member>],
    origin: SocketAddr,
    opts: &Opts,
    upgrade: bool,
) -> Result<(Sender, Arc<Member>), UpstreamError> {
    for m in members {
        if !upgrade {
            if let Some(s) = m.idle.take() {
                return Ok((s, m.clone()));
            }
        }
        match tokio::time::timeout(opts.open_timeout, open(m, origin, opts, upgrade)).await {
            Ok(Some(s)) => return Ok((s, m.clone())),
            Ok(None) => {}
            Err(_) => tracing::info!(
                conn = m.conn,
                "tunnel client did not open a channel in time; trying the next"
            ),
        }
    }
    Err(UpstreamError::Unavailable)
}

async fn open(m: &Member, origin: SocketAddr, opts: &Opts, upgrade: bool) -> Option<Sender> {
    let ip = origin.ip().to_canonical().to_string();
    let (channel, slot) = open_channel(m, &ip, u32::from(origin.port()), opts.max_channels).await?;
    let io = TokioIo::new(channel_io(channel, m.handle.clone(), opts.buffer, Some(slot)));
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| tracing::info!(error = %e, "upstream handshake failed"))
        .ok()?;
    tokio::spawn(async move {
        let res = if upgrade {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = res {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Some(sender)
}

/// Returns a connection to its member's idle list once its response has been read in full.
/// Waiting happens in its own task, so a slow download never blocks another request.
pub fn release(member: Arc<Member>, mut sender: Sender) {
    tokio::spawn(async move {
        if sender.ready().await.is_ok() {
            member.idle.put(sender);
        }
    });
}
