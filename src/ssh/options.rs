//! The access rules a tunnel owner types after the host (`ssh -R … gw -- auth=… private`), the
//! wait that keeps a forward unserved until they are known, and the commands that go with them:
//! `ssh gw help` and `ssh gw link NAME`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::server::Session;
use russh::ChannelId;

use super::handler::Handler;
use super::{SessionStage, SshContext};
use crate::rules::{options, GateState, Rules};

/// How long a connection's forwards wait for a session channel before they are served with the
/// default rules (`ssh -N` never opens one; OpenSSH opens it right after its forwards).
const OPTIONS_GRACE: Duration = Duration::from_millis(700);
/// How long an open session channel may take to send its shell or command request.
const SESSION_GRACE: Duration = Duration::from_secs(4);
/// Validity of a `link` when no hours are given, and the most that may be asked for.
const LINK_HOURS: u64 = 24;
const MAX_LINK_HOURS: u64 = 24 * 30;

const HELP: &str = "\
edgemux: options go after the host, and apply to the tunnels of that ssh command:
  ssh -R app:80:localhost:3000 GATEWAY -- auth=USER:PASS allow=CIDR,... rate=N/s private

  auth=USER:PASS     visitors must log in with HTTP basic auth
  allow=CIDR,...     only these client addresses (others get 403)
  rate=N/s, N/m      at most N requests per second (or minute) to each tunnel (excess: 429)
  private            only visitors with a link: ssh GATEWAY link NAME prints one
  upstream=h2c       speak HTTP/2 without TLS to your app (gRPC); default upstream=h1
  tls=passthrough    on -R NAME:443:localhost:8443: TLS is not terminated here, your server
                     and its certificate see the visitor's bytes as sent (allow= only)

commands:
  ssh GATEWAY tunnels          your tunnels, with their rules (JSON)
  ssh GATEWAY link NAME [H]    a link to private tunnel NAME, valid H hours (default 24)
  ssh GATEWAY help             this text
";

impl Handler {
    /// Starts the wait after which this connection's forwards are served with the default rules
    /// unless a session brought options first (once per connection). The task holds the gate,
    /// not the connection, so a closed connection deregisters at once.
    pub(super) fn arm_options_grace(&mut self) {
        if std::mem::replace(&mut self.options_armed, true) {
            return;
        }
        let gate = self.shared.gate.clone();
        let shared = Arc::downgrade(&self.shared);
        let (ctx, client) = (self.ctx.clone(), self.client);
        tokio::spawn(async move {
            tokio::time::sleep(OPTIONS_GRACE).await;
            let session_open = shared.upgrade().is_some_and(|s| !s.sessions().is_empty());
            if session_open {
                tokio::time::sleep(SESSION_GRACE).await;
            }
            gate.settle(defaults(&ctx, client));
        });
    }

    /// A shell or a command other than options: the forwards are served with the defaults.
    pub(super) fn settle_defaults(&self) {
        self.shared.gate.settle(defaults(&self.ctx, self.client));
    }

    /// An options line: applied whole to this connection's forwards and shown with the banner
    /// (the channel stays open, like a shell), or refused whole: the forwards are never served
    /// and the command fails, which ends a plain `ssh -R … gw -- …`.
    pub(super) fn apply_options(
        &mut self,
        channel: ChannelId,
        line: &[u8],
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let parsed = options::parse(line)
            .map_err(|e| e.to_string())
            .and_then(|o| self.ctx.access.apply(o))
            .and_then(|o| self.passthrough_on_443(o));
        let refusal = match parsed {
            Ok(parsed) => {
                let rules = Rules::from_options(parsed);
                let summary = rules.summary();
                if self.shared.gate.settle(GateState::Ready(Arc::new(rules))) {
                    if !self.advance_session(channel, SessionStage::Opened, SessionStage::Answered) {
                        return self.refuse_session_request(channel, session);
                    }
                    session.channel_success(channel)?;
                    self.flush_refusals(channel, session)?;
                    let text = format!("edgemux: access rules for these tunnels: {summary}\r\n");
                    session.data(channel, text.into_bytes())?;
                    return session.data(channel, self.banner().into_bytes());
                }
                "this connection's tunnels are already served; options go on the ssh command that opens them"
                    .to_owned()
            }
            Err(e) => {
                crate::metrics::ssh_options_refused();
                // Not the text: a password with a space in it would show up in the log.
                tracing::info!(client = %self.client, "tunnel options refused");
                let consequence = if self.shared.gate.settle(GateState::Refused) {
                    "these tunnels are not served"
                } else {
                    "this connection's tunnels keep the rules they were served with"
                };
                format!("{e}\r\nedgemux: {consequence}; see: ssh {} help", self.ctx.domain)
            }
        };
        if !self.advance_session(channel, SessionStage::Opened, SessionStage::Closing) {
            return self.refuse_session_request(channel, session);
        }
        session.channel_success(channel)?;
        self.flush_refusals(channel, session)?;
        session.extended_data(channel, 1, format!("edgemux: {refusal}\r\n").into_bytes())?;
        session.exit_status_request(channel, 2)?;
        session.eof(channel)?;
        session.close(channel)
    }

    /// `tls=passthrough` is for `-R NAME:443:…`: a forward on port 80 would be reached by
    /// plain HTTP, which the gateway answers itself (a redirect to https).
    fn passthrough_on_443(&self, o: options::Options) -> Result<options::Options, String> {
        if o.upstream != Some(options::Upstream::Passthrough) {
            return Ok(o);
        }
        let forwards = self.shared.forwards();
        match forwards.keys().find(|(_, port)| *port == 80) {
            Some((name, _)) => Err(format!(
                "tls=passthrough applies to -R NAME:443:… forwards, and {name}:80 is not one"
            )),
            None => Ok(o),
        }
    }

    pub(super) fn help() -> &'static str {
        HELP
    }

    /// `link NAME [HOURS]`: a URL that lets its holder into private tunnel NAME of this key.
    pub(super) fn link(&self, args: &[&str]) -> Result<String, String> {
        let usage = || format!("usage: link NAME [HOURS] (HOURS from 1 to {MAX_LINK_HOURS})");
        let (name, hours) = match args {
            [name] => (*name, LINK_HOURS),
            [name, hours] => (*name, hours.parse().map_err(|_| usage())?),
            _ => return Err(usage()),
        };
        if hours == 0 || hours > MAX_LINK_HOURS {
            return Err(usage());
        }
        let owner = self.key.ok_or("not authenticated")?;
        let (_, host) = self.forward_host(name, &owner)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let token = self.ctx.links.mint(&host, now + hours * 3600);
        Ok(format!(
            "{}/?{}={token}",
            self.ctx.url_for(&host),
            crate::rules::token::QUERY
        ))
    }
}

/// The rules of a connection that sent no options: none, within the operator's policy (which
/// may refuse a tunnel without protection: it is then never served).
fn defaults(ctx: &SshContext, client: std::net::SocketAddr) -> GateState {
    match ctx.access.apply(crate::rules::Options::default()) {
        Ok(o) => GateState::Ready(Arc::new(Rules::from_options(o))),
        Err(why) => {
            crate::metrics::ssh_options_refused();
            tracing::info!(%client, reason = why, "tunnels without options refused");
            GateState::Refused
        }
    }
}
