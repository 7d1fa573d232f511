//! Session channels: the interactive banner, `ssh gw tunnels`, one answer per channel, and the
//! refusals a client is shown there.

use russh::server::Session;
use russh::ChannelId;

use super::handler::Handler;
use super::SessionStage;
use crate::names::KeyFingerprint;
use crate::tunnels::Route;

impl Handler {
    /// Moves session channel `channel` from `from` to `to`; false (and nothing changes) when it
    /// is not at `from`, e.g. a second shell request on one channel.
    pub(super) fn advance_session(&self, channel: ChannelId, from: SessionStage, to: SessionStage) -> bool {
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
    pub(super) fn refuse_session_request(
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

    /// The caller's tunnels, as `ssh gw tunnels` prints them.
    fn tunnels_json(&self) -> String {
        let key = self.key;
        let snapshot = self.ctx.tunnels.snapshot();
        let directory = self.ctx.directory.as_ref();
        let mine = |k: &KeyFingerprint| Some(*k) == key;
        let mut list = crate::tunnels::tunnels_json(&snapshot, directory, self.ctx.public_port, mine);
        list["keyid"] = serde_json::Value::String(key.map(|k| k.key_id()).unwrap_or_default());
        list.to_string()
    }

    pub(super) fn banner(&self) -> String {
        let mut text = String::from("edgemux: your tunnels\r\n");
        if matches!(self.shared.gate.state(), crate::rules::GateState::Refused) {
            text.push_str(&format!(
                "edgemux: these tunnels are not served: this gateway requires options on them (see: ssh {} help)\r\n",
                self.ctx.domain
            ));
        }
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

    pub(super) fn flush_refusals(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        for message in self.refusals.take_messages() {
            session.extended_data(channel, 1, format!("edgemux: {message}\r\n").into_bytes())?;
        }
        Ok(())
    }

    /// Answers `ssh gw COMMAND` and closes the channel.
    pub(super) fn run_command(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let command = String::from_utf8_lossy(data);
        let words: Vec<&str> = command.split_ascii_whitespace().take(4).collect();
        let status = match words.as_slice() {
            ["tunnels"] => {
                session.data(channel, (self.tunnels_json() + "\n").into_bytes())?;
                0
            }
            ["help"] => {
                session.data(channel, Self::help().replace('\n', "\r\n").into_bytes())?;
                0
            }
            ["link", args @ ..] => match self.link(args) {
                Ok(url) => {
                    session.data(channel, format!("{url}\n").into_bytes())?;
                    0
                }
                Err(e) => {
                    session.extended_data(channel, 1, format!("edgemux: {e}\n").into_bytes())?;
                    1
                }
            },
            _ => {
                // A mistyped option (`Private`, `allow 10.0.0.0/8`) must not leave the tunnels
                // served without the rules it meant: they are not served at all.
                let refused = self.shared.gate.settle(crate::rules::GateState::Refused);
                let shown: String = command.trim().chars().take(64).collect();
                let mut msg = format!(
                    "edgemux: unknown command or option {shown:?}; see: ssh {} help\n",
                    self.ctx.domain
                );
                if refused && !self.shared.forwards().is_empty() {
                    msg.push_str("edgemux: these tunnels are not served\n");
                }
                session.extended_data(channel, 1, msg.into_bytes())?;
                1
            }
        };
        session.exit_status_request(channel, status)?;
        session.eof(channel)?;
        session.close(channel)
    }
}
