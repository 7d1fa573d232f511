//! The per-connection russh handler: authentication, and the dispatch of every request to its
//! owner (`forwards` for `tcpip-forward`, `session` for session channels, `channels` for the
//! `direct-tcpip` bridge).
//!
//! Nothing here awaits a channel open on a session handle: russh would deadlock the session, so
//! every such open happens in a spawned task.
//!
//! A client gets a bounded amount of work however it behaves: at most `MAX_SESSIONS_PER_CONN`
//! session channels, one answer per session channel, and `refusals::MAX_REFUSALS_PER_CONN`
//! refused requests before it is disconnected, with only the first few refusals logged.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::Algorithm;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};

use super::keys::fingerprint;
use super::refusals::{Refusals, Verdict};
use super::{ConnShared, SessionStage, SshContext};
use crate::io::{ClientAddr, ClientKey};
use crate::names::{self, KeyFingerprint};
use crate::tunnels::{Route, TunnelKey};

/// Session channels one SSH connection may hold open, OpenSSH's `MaxSessions` default: the banner
/// and `ssh gw tunnels` need one each (a few more with ControlMaster). Unbounded, 60,000 of them
/// on one connection grew the gateway's RSS from 30 to 214 MB.
const MAX_SESSIONS_PER_CONN: usize = 10;
/// Delay after a refused key, doubling per failure up to the maximum. russh's constant-time
/// rejection (500 ms) runs concurrently, so each refusal takes the longer of the two.
const AUTH_DELAY_START: Duration = Duration::from_millis(250);
const AUTH_DELAY_MAX: Duration = Duration::from_secs(4);
pub(super) struct Handler {
    pub(super) ctx: Arc<SshContext>,
    pub(super) shared: Arc<ConnShared>,
    pub(super) auth_failures: u32,
    pub(super) vpce: Option<String>,
    pub(super) conn: u64,
    pub(super) client: SocketAddr,
    pub(super) user: String,
    /// The key this connection authenticated with.
    pub(super) key: Option<KeyFingerprint>,
    /// Refused requests, counted, with the first few messages kept for a session channel.
    pub(super) refusals: Refusals,
    /// Whether the timer that disconnects a client with nothing but refusals was started (once
    /// per connection).
    pub(super) grace_armed: bool,
    /// Whether the timer that serves the forwards with the default rules was started.
    pub(super) options_armed: bool,
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
            options_armed: false,
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
    pub(super) fn count_refusal(&mut self, request: &'static str, message: &str, session: &Session) -> bool {
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
        Ok(self.add_forward(address, port, session))
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
        self.settle_defaults();
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
        if crate::rules::options::looks_like_options(&String::from_utf8_lossy(data)) {
            return self.apply_options(channel, data, session);
        }
        if !self.advance_session(channel, SessionStage::Opened, SessionStage::Closing) {
            return self.refuse_session_request(channel, session);
        }
        session.channel_success(channel)?;
        self.flush_refusals(channel, session)?;
        self.run_command(channel, data, session)
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
        let members = match &target {
            Some(k) => self.ctx.directory.find(k).await,
            None => Vec::new(),
        };
        // HTTP tunnels too: a channel straight into one skips the proxy's header rewriting, so
        // only keys that may reach a private tunnel of the owner get one.
        let allowed = members
            .first()
            .is_some_and(|m| self.ctx.may_reach(&m.key(), &visitor));
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
        let visitor_key = visitor;
        let visitor = (channel, session.handle(), ClientKey::of(self.client.ip()));
        let reach = (self.ctx.directory.clone(), self.ctx.budget.clone());
        let who = (origin, self.vpce.clone(), visitor_key);
        tokio::spawn(super::channels::bridge(
            reach, members, visitor, reply, who, bounds,
        ));
        Ok(())
    }
}
