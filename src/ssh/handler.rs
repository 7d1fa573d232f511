//! The per-connection russh handler: authentication, `tcpip-forward` registration, `direct-tcpip`
//! to private tunnels, and the session channel that reports tunnels.
//!
//! Nothing here awaits a channel open on a session handle: russh would deadlock the session, so
//! every such open happens in a spawned task.
//!
//! A client gets a bounded amount of work however it behaves: at most `MAX_SESSIONS_PER_CONN`
//! session channels, one answer per session channel, and `refusals::MAX_REFUSALS_PER_CONN`
//! refused requests before it is disconnected, with only the first few refusals logged.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use russh::keys::Algorithm;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};

use super::keys::fingerprint;
use super::refusals::{Refusals, Verdict};
use super::{ConnShared, SessionStage, SshContext};
use crate::io::{ClientAddr, ClientKey};
use crate::names::{self, KeyFingerprint, TunnelName};
use crate::tunnels::{Member, Route, TunnelKey};

/// How many `tcpip-forward`s one SSH connection may hold.
const MAX_FORWARDS_PER_CONN: usize = 64;
/// Session channels one SSH connection may hold open, OpenSSH's `MaxSessions` default: the banner
/// and `ssh gw tunnels` need one each (a few more with ControlMaster). Unbounded, 60,000 of them
/// on one connection grew the gateway's RSS from 30 to 214 MB.
const MAX_SESSIONS_PER_CONN: usize = 10;
/// A `-N` client whose every forward was refused is told why and disconnected after this long
/// (OpenSSH sends its forwards before it opens a session, so wait for a session briefly).
const REFUSAL_GRACE: Duration = Duration::from_millis(700);
/// Delay after a refused key, doubling per failure up to the maximum. russh's constant-time
/// rejection (500 ms) runs concurrently, so each refusal takes the longer of the two.
const AUTH_DELAY_START: Duration = Duration::from_millis(250);
const AUTH_DELAY_MAX: Duration = Duration::from_secs(4);
/// Where ports are handed out for `-R 0:…` requests.
const FIRST_ASSIGNED_PORT: u32 = 10_000;

pub(super) struct Handler {
    ctx: Arc<SshContext>,
    shared: Arc<ConnShared>,
    auth_failures: u32,
    vpce: Option<String>,
    conn: u64,
    client: SocketAddr,
    user: String,
    /// The key this connection authenticated with.
    key: Option<KeyFingerprint>,
    /// Refused requests, counted, with the first few messages kept for a session channel.
    refusals: Refusals,
    /// Whether the timer that disconnects a client with nothing but refusals was started (once
    /// per connection).
    grace_armed: bool,
}

impl Handler {
    pub(super) fn new(
        ctx: Arc<SshContext>,
        conn: u64,
        ClientAddr { client, vpce }: ClientAddr,
        shared: Arc<ConnShared>,
    ) -> Self {
        Self {
            vpce,
            shared,
            auth_failures: 0,
            ctx,
            conn,
            client,
            user: String::new(),
            key: None,
            refusals: Refusals::default(),
            grace_armed: false,
        }
    }

    /// Counts a refused key and slows the next attempt: 250 ms, doubling, at most 4 s.
    async fn refused(&mut self) {
        crate::metrics::ssh_auth("refused");
        self.auth_failures += 1;
        let delay = AUTH_DELAY_START.saturating_mul(1 << self.auth_failures.min(5)) / 2;
        tokio::time::sleep(delay.min(AUTH_DELAY_MAX)).await;
    }

    /// Whether a login signature would be `ssh-rsa`, RSA with SHA-1, which is refused (logged
    /// with the fix). russh checks that the signature is made with the algorithm the client
    /// names; `server-sig-algs` offers only rsa-sha2-256/512 for RSA keys, so OpenSSH 7.2 and
    /// later never send one, but other clients may.
    fn sha1_login(&self, algorithm: &Algorithm) -> bool {
        let sha1 = *algorithm == (Algorithm::Rsa { hash: None });
        if sha1 {
            tracing::info!(
                conn = self.conn,
                client = %self.client,
                "ssh-rsa (SHA-1) login signature refused: sign with rsa-sha2-256 or rsa-sha2-512 \
                 (OpenSSH 7.2 or later) or use an Ed25519 key"
            );
        }
        sha1
    }

    /// Counts a refused request of kind `request`: the first few are logged, and the one that
    /// reaches the cap disconnects the client. Returns whether the client is to be told why.
    fn count_refusal(&mut self, request: &'static str, message: &str, session: &Session) -> bool {
        let (conn, client) = (self.conn, self.client);
        match self.refusals.note() {
            Verdict::Tell => {
                tracing::info!(conn, %client, request, %message, "request refused");
                true
            }
            Verdict::Quiet => false,
            Verdict::Cut => {
                let refused = self.refusals.count();
                tracing::info!(conn, %client, refused, "too many refused requests: disconnecting");
                let handle = session.handle();
                tokio::spawn(async move {
                    let why = format!("{refused} requests refused; closing the connection");
                    super::disconnect(&handle, &why).await;
                });
                false
            }
        }
    }

    fn refuse_forward(&mut self, request: &'static str, message: String, session: &Session) {
        if !self.count_refusal(request, &message, session) {
            return;
        }
        let session_channel = self
            .shared
            .sessions()
            .iter()
            .find(|(_, s)| **s != SessionStage::Closing)
            .map(|(id, _)| *id);
        if let Some(id) = session_channel {
            let handle = session.handle();
            let text = format!("edgemux: {message}\r\n");
            tokio::spawn(async move {
                let _ = handle.extended_data(id, 1, text.into_bytes()).await;
            });
            return;
        }
        self.refusals.keep(message.clone());
        if std::mem::replace(&mut self.grace_armed, true) {
            return;
        }
        // Weak: a connection that ends meanwhile deregisters its tunnels at once, not after the grace.
        let (shared, handle) = (Arc::downgrade(&self.shared), session.handle());
        tokio::spawn(async move {
            tokio::time::sleep(REFUSAL_GRACE).await;
            let nothing_else = shared
                .upgrade()
                .is_some_and(|s| s.forwards().is_empty() && s.sessions().is_empty());
            if nothing_else {
                super::disconnect(&handle, &message).await;
            }
        });
    }

    /// Moves session channel `channel` from `from` to `to`; false (and nothing changes) when it
    /// is not at `from`, e.g. a second shell request on one channel.
    fn advance_session(&self, channel: ChannelId, from: SessionStage, to: SessionStage) -> bool {
        let mut sessions = self.shared.sessions();
        match sessions.get_mut(&channel) {
            Some(stage) if *stage == from => {
                *stage = to;
                true
            }
            _ => false,
        }
    }

    /// A session request (shell, command) on a channel that already had its answer, or none.
    fn refuse_session_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        self.count_refusal(
            "session request",
            "one shell or command per session channel",
            session,
        );
        session.channel_failure(channel)
    }

    /// The tunnel name and host a `tcpip-forward` bind address asks for: a vanity host reserved
    /// for this key (`[[ssh.reserve]]`), else `<name>-<keyid>.<domain>`.
    fn forward_host(&self, address: &str, key: &KeyFingerprint) -> Result<(String, String), String> {
        let wanted = address.trim_end_matches('.').to_ascii_lowercase();
        if let Some(owner) = self.ctx.reserved.get(&wanted) {
            return if owner == key {
                Ok((wanted.clone(), wanted))
            } else {
                Err(format!("{wanted} is reserved for another key"))
            };
        }
        let name: TunnelName = names::name_for_bind(address, &self.user)
            .map_err(|e| format!("{e}; try -R myapp:80:localhost:3000"))?;
        // The short id in the host is this key's only if no other key claimed it first.
        self.ctx.owners.claim(key).map_err(|e| e.to_string())?;
        let host = names::host_for(&name, &key.key_id(), &self.ctx.domain);
        Ok((name.to_string(), host))
    }

    fn assign_port(&self, host: &str) -> u32 {
        let used: HashSet<u32> = self
            .ctx
            .tunnels
            .snapshot()
            .into_iter()
            .filter(|(k, _)| k.host == host)
            .filter_map(|(k, _)| match k.route {
                Route::Tcp(p) => Some(p),
                Route::Http => None,
            })
            .collect();
        (FIRST_ASSIGNED_PORT..u32::from(u16::MAX))
            .find(|p| !used.contains(p))
            .unwrap_or(FIRST_ASSIGNED_PORT)
    }

    /// The caller's tunnels, as `ssh gw tunnels` prints them.
    fn tunnels_json(&self) -> String {
        let key = self.key;
        let snapshot = self.ctx.tunnels.snapshot();
        let mut list = crate::tunnels::tunnels_json(&snapshot, self.ctx.public_port, |m| Some(m.key) == key);
        list["keyid"] = serde_json::Value::String(key.map(|k| k.key_id()).unwrap_or_default());
        list.to_string()
    }

    fn banner(&self) -> String {
        let mut text = String::from("edgemux: your tunnels\r\n");
        let forwards = self.shared.forwards();
        for ((addr, port), reg) in forwards.iter() {
            let key = reg.key();
            let line = match key.route {
                Route::Http => format!("  {}  ->  -R {addr}:{port}\r\n", self.ctx.url_for(&key.host)),
                Route::Tcp(p) => format!(
                    "  tcp {host}:{p}  (reach it with: ssh -L {p}:{host}:{p} {domain})\r\n",
                    host = key.host,
                    domain = self.ctx.domain
                ),
            };
            text.push_str(&line);
        }
        if forwards.is_empty() {
            text.push_str("  none yet: add -R myapp:80:localhost:3000 to your ssh command\r\n");
        }
        text.push_str("Press Ctrl-C to close.\r\n");
        text
    }

    fn flush_refusals(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), russh::Error> {
        for message in self.refusals.take_messages() {
            session.extended_data(channel, 1, format!("edgemux: {message}\r\n").into_bytes())?;
        }
        Ok(())
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let unlogged = self.refusals.unlogged();
        if unlogged > 0 {
            let (refused, channels) = (self.refusals.count(), self.refusals.uncapped());
            let (conn, client) = (self.conn, self.client);
            tracing::info!(conn, %client, refused, direct_tcpip_refused = channels, unlogged, "refusals on this connection");
        }
    }
}

impl russh::server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.ctx.policy.allows(&fingerprint(offer.public_key)) && !self.sha1_login(offer.algorithm) {
            return Ok(Auth::Accept);
        }
        self.refused().await;
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fp = fingerprint(key.public_key);
        let keyid = fp.key_id();
        if !self.ctx.policy.allows(&fp) || self.sha1_login(key.algorithm) {
            tracing::info!(conn = self.conn, client = %self.client, %keyid, key = %fp, "ssh key refused");
            self.refused().await;
            return Ok(Auth::reject());
        }
        crate::metrics::ssh_auth("ok");
        self.shared.authenticated.store(true, Ordering::Release);
        let vpce = self.vpce.as_deref().unwrap_or("");
        tracing::info!(conn = self.conn, client = %self.client, vpce, user, %keyid, key = %fp, "ssh authenticated");
        self.user = user.to_owned();
        self.key = Some(fp);
        Ok(Auth::Accept)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        const REQUEST: &str = "tcpip-forward";
        let Some(owner) = self.key.filter(|_| !self.refusals.is_cut()) else {
            return Ok(false);
        };
        let (name, host) = match self.forward_host(address, &owner) {
            Ok(found) => found,
            Err(message) => {
                self.refuse_forward(REQUEST, message, session);
                return Ok(false);
            }
        };
        let per_key = self.ctx.limits.load_full().tunnels_per_key;
        if self.ctx.tunnels.count(|m| m.key == owner) >= per_key {
            self.refuse_forward(
                REQUEST,
                format!("at most {per_key} tunnels per key (limits.tunnels_per_key)"),
                session,
            );
            return Ok(false);
        }
        if self.shared.forwards().len() >= MAX_FORWARDS_PER_CONN {
            self.refuse_forward(
                REQUEST,
                format!("at most {MAX_FORWARDS_PER_CONN} tunnels per connection"),
                session,
            );
            return Ok(false);
        }
        if *port == 0 {
            *port = self.assign_port(&host);
        }
        let taken = self.shared.forwards().contains_key(&(address.to_owned(), *port));
        if *port > u32::from(u16::MAX) || taken {
            self.refuse_forward(
                REQUEST,
                format!("port {port} is not available for {name}"),
                session,
            );
            return Ok(false);
        }
        let key = TunnelKey {
            host: host.clone(),
            route: Route::for_port(*port),
        };
        if let (Route::Http, Some(hook)) = (key.route, &self.ctx.on_http_tunnel) {
            hook(&key.host);
        }
        let member = |id| Member {
            id,
            conn: self.conn,
            key: owner,
            name: name.to_string(),
            bind_address: address.to_owned(),
            bind_port: *port,
            client: self.client,
            since: SystemTime::now(),
            handle: session.handle(),
            stats: Default::default(),
            vpce: self.vpce.clone(),
        };
        match self.ctx.tunnels.register(key, owner, member) {
            Ok(reg) => {
                self.shared.forwards().insert((address.to_owned(), *port), reg);
                Ok(true)
            }
            Err(owned) => {
                self.refuse_forward(REQUEST, owned.to_string(), session);
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let removed = self.shared.forwards().remove(&(address.to_owned(), port));
        if removed.is_none() {
            let message = format!("no tunnel {address}:{port} to cancel");
            self.count_refusal("cancel-tcpip-forward", &message, session);
        }
        Ok(removed.is_some())
    }

    async fn streamlocal_forward(&mut self, path: &str, session: &mut Session) -> Result<bool, Self::Error> {
        let message =
            format!("{path}: Unix socket forwarding is not supported; try -R myapp:80:localhost:3000");
        self.refuse_forward("streamlocal-forward", message, session);
        Ok(false)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.count_refusal(
            "cancel-streamlocal-forward",
            &format!("no {path} to cancel"),
            session,
        );
        Ok(false)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let open = self.shared.sessions().len();
        if open >= MAX_SESSIONS_PER_CONN || self.refusals.is_cut() {
            let message = format!("at most {MAX_SESSIONS_PER_CONN} session channels per connection");
            self.count_refusal("session", &message, session);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        // Keystrokes arrive through `data`; dropping the channel object keeps its queue from filling.
        self.shared.sessions().insert(channel.id(), SessionStage::Opened);
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        if !self.advance_session(channel, SessionStage::Opened, SessionStage::Answered) {
            return self.refuse_session_request(channel, session);
        }
        session.channel_success(channel)?;
        self.flush_refusals(channel, session)?;
        session.data(channel, self.banner().into_bytes())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.advance_session(channel, SessionStage::Opened, SessionStage::Closing) {
            return self.refuse_session_request(channel, session);
        }
        session.channel_success(channel)?;
        self.flush_refusals(channel, session)?;
        let command = String::from_utf8_lossy(data);
        let status = match command.trim() {
            "tunnels" => {
                session.data(channel, (self.tunnels_json() + "\n").into_bytes())?;
                0
            }
            other => {
                let msg = format!("edgemux: unknown command {other:?}; try: tunnels\n");
                session.extended_data(channel, 1, msg.into_bytes())?;
                1
            }
        };
        session.exit_status_request(channel, status)?;
        session.eof(channel)?;
        session.close(channel)
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Ctrl-C or Ctrl-D in the interactive session ends it, once.
        let interrupt = data.iter().any(|b| *b == 3 || *b == 4);
        if interrupt && self.advance_session(channel, SessionStage::Answered, SessionStage::Closing) {
            session.data(channel, b"bye\r\n".to_vec())?;
            session.exit_status_request(channel, 0)?;
            session.eof(channel)?;
            session.close(channel)?;
        }
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.shared.sessions().remove(&channel);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(visitor) = self.key.filter(|_| !self.refusals.is_cut()) else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let target = names::canonical_host(host_to_connect, &self.ctx.domain).map(|host| TunnelKey {
            host,
            route: Route::for_port(port_to_connect),
        });
        let members = target
            .as_ref()
            .map(|k| self.ctx.directory.members(k))
            .unwrap_or_default();
        // HTTP tunnels too: a channel straight into one skips the proxy's header rewriting, so
        // only keys that may reach a private tunnel of the owner get one.
        let allowed = members
            .first()
            .is_some_and(|m| self.ctx.may_reach(&m.key, &visitor));
        if !allowed {
            if self.refusals.note_uncapped() {
                tracing::info!(conn = self.conn, client = %self.client, target = host_to_connect, port = port_to_connect, "direct-tcpip refused");
            }
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        // The tunnel client is told who connected as this gateway knows it (after PROXY), never
        // what the SSH client claims, as the HTTP proxy does.
        let origin = (
            self.client.ip().to_canonical().to_string(),
            u32::from(self.client.port()),
        );
        let bounds = (
            self.ctx.limits.load_full().tunnel_open_timeout,
            self.ctx.channel_buffer,
        );
        let visitor = (channel, session.handle(), ClientKey::of(self.client.ip()));
        let reach = (self.ctx.directory.clone(), self.ctx.budget.clone());
        tokio::spawn(super::channels::bridge(
            reach, members, visitor, reply, origin, bounds,
        ));
        Ok(())
    }
}
