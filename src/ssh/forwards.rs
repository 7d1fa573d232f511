//! `tcpip-forward` on one SSH connection: the host a bind address asks for, the checks a forward
//! passes (the key's claim on its id, per-key and per-connection caps, ports), its registration,
//! and refusals shown to the client.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use russh::server::Session;

use super::handler::Handler;
use super::SessionStage;
use crate::names::{self, KeyFingerprint, TunnelName};
use crate::tunnels::{Member, Route, TunnelKey};

/// How many `tcpip-forward`s one SSH connection may hold.
const MAX_FORWARDS_PER_CONN: usize = 64;
/// A `-N` client whose every forward was refused is told why and disconnected after this long
/// (OpenSSH sends its forwards before it opens a session, so wait for a session briefly).
const REFUSAL_GRACE: Duration = Duration::from_millis(700);
/// Where ports are handed out for `-R 0:…` requests.
const FIRST_ASSIGNED_PORT: u32 = 10_000;

impl Handler {
    /// Registers the forward a client asked for, or refuses it with a message. `port` 0 asks
    /// for a port to be assigned and is set to it.
    pub(super) fn add_forward(&mut self, address: &str, port: &mut u32, session: &Session) -> bool {
        const REQUEST: &str = "tcpip-forward";
        let Some(owner) = self.key.filter(|_| !self.refusals.is_cut()) else {
            return false;
        };
        let (name, host) = match self.forward_host(address, &owner) {
            Ok(found) => found,
            Err(message) => {
                self.refuse_forward(REQUEST, message, session);
                return false;
            }
        };
        let per_key = self.ctx.limits.load_full().tunnels_per_key;
        if self.ctx.tunnels.count(|m| m.key == owner) >= per_key {
            self.refuse_forward(
                REQUEST,
                format!("at most {per_key} tunnels per key (limits.tunnels_per_key)"),
                session,
            );
            return false;
        }
        if self.shared.forwards().len() >= MAX_FORWARDS_PER_CONN {
            self.refuse_forward(
                REQUEST,
                format!("at most {MAX_FORWARDS_PER_CONN} tunnels per connection"),
                session,
            );
            return false;
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
            return false;
        }
        let key = TunnelKey {
            host: host.clone(),
            route: Route::for_port(*port),
        };
        if key.route == Route::Http {
            // Once the owner's options are known: on-demand ACME (a TLS passthrough tunnel's
            // certificate is the owner's, and a refused tunnel needs none), and the cluster's
            // directory, which publishes the pool then, with how its app is spoken to.
            let (hook, gate) = (self.ctx.on_http_tunnel.clone(), self.shared.gate.clone());
            let (tunnels, key) = (self.ctx.tunnels.clone(), key.clone());
            tokio::spawn(async move {
                let Some(rules) = gate.ready(crate::rules::SETTLE_WITHIN).await else {
                    return;
                };
                // The directory publishes an HTTP pool only once its options are known.
                tunnels.touch(&key);
                if let (Some(hook), true) = (hook, rules.upstream != crate::rules::Upstream::Passthrough) {
                    hook(&key.host);
                }
            });
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
            gate: self.shared.gate.clone(),
            bucket: std::sync::OnceLock::new(),
        };
        match self.ctx.tunnels.register(key, owner, member) {
            Ok(reg) => {
                self.shared.forwards().insert((address.to_owned(), *port), reg);
                self.arm_options_grace();
                true
            }
            Err(owned) => {
                self.refuse_forward(REQUEST, owned.to_string(), session);
                false
            }
        }
    }

    /// Refuses a forward with `message`: shown on a session channel when there is one, else kept
    /// for the first one, and a client with nothing but refusals is disconnected with it after
    /// a short grace.
    pub(super) fn refuse_forward(&mut self, request: &'static str, message: String, session: &Session) {
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

    /// The tunnel name and host a `tcpip-forward` bind address asks for: a vanity host reserved
    /// for this key (`[[ssh.reserve]]`), else `<name>-<keyid>.<domain>`.
    pub(super) fn forward_host(
        &self,
        address: &str,
        key: &KeyFingerprint,
    ) -> Result<(String, String), String> {
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
}
