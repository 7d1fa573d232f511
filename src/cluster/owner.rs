//! The owner's side of a peer stream: open a `forwarded-tcpip` channel to one of this replica's
//! own members of the pool the request names, with the visitor's real address as originator.
//!
//! Hop limit 1: only the local directory is asked, never the cluster one, so a request is never
//! passed on to a third replica; a host not held here is `NO_ROUTE` and the dialer tries the
//! next candidate.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::peer::codec::{Op, PeerRequest};
use super::peer::link::server::{Dialing, Killing, Looking, PeerHandler, MAX_LIST};
use super::peer::status::Status;
use super::store::{encode_route, LocalRoutes};
use crate::io::ClientKey;
use crate::rules::Upstream;
use crate::tunnels::{first_member, Directory, Opened, Reach, Route, TunnelKey, Tunnels, Visitor};

/// Serves peer dials and kills from this replica's own tunnels.
pub(crate) struct OwnerSide {
    tunnels: Arc<Tunnels>,
    local: Arc<dyn Directory>,
    open_timeout: Duration,
    /// Whether the store serves this replica (for a ping).
    store_up: Box<dyn Fn() -> bool + Send + Sync>,
}

impl OwnerSide {
    /// `local` must be the local directory (hop limit 1); `open_timeout` bounds each member's
    /// channel open, as for a visitor who landed here; `store_up` answers pings.
    pub(crate) fn new(
        (tunnels, local): (Arc<Tunnels>, Arc<dyn Directory>),
        open_timeout: Duration,
        store_up: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Self {
            tunnels,
            local,
            open_timeout,
            store_up,
        }
    }
}

impl PeerHandler for OwnerSide {
    fn dial<'a>(&'a self, req: &'a PeerRequest) -> Dialing<'a> {
        Box::pin(async move {
            let key = TunnelKey {
                host: req.host().to_owned(),
                route: route_of(req),
            };
            tracing::debug!(
                sender = req.sender(),
                host = req.host(),
                visitor = %req.source(),
                reached = %req.destination(),
                vpce = req.vpce(),
                on_behalf = req.on_behalf().map(|k| k.to_string()),
                "peer dial"
            );
            let members = self.local.members(&key);
            if members.is_empty() {
                return Err((Status::NoRoute, "no tunnel for this host here".to_owned()));
            }
            // A tunnel's access rules are checked where its HTTP requests are read, and that is
            // the visitor's replica, which does not have them: such tunnels are served only by
            // the replica their client is connected to, never opened to a peer unchecked. So are
            // passthrough tunnels (their TLS is the owner's own: nothing for a peer to route).
            let members = match key.route {
                Route::Http => admit_peer(members, req.op(), req.source().ip()).await?,
                Route::Tcp(_) => members,
            };
            let source = req.source();
            let ip = source.ip().to_canonical().to_string();
            // The visitor is charged here as if it had landed here: shares and budget.
            let visitor = Visitor {
                origin: (ip.as_str(), u32::from(source.port())),
                client: ClientKey::of(source.ip()),
                vpce: req.vpce(),
                key: req.on_behalf(),
            };
            let opened = first_member(&members, self.open_timeout, |m| {
                let local = self.local.clone();
                async move { local.open(&m, visitor).await }
            })
            .await;
            match opened {
                Some((Opened { stream, .. }, _)) => Ok(stream),
                None => Err((
                    Status::OpenFailed,
                    "no tunnel client here opened a channel".to_owned(),
                )),
            }
        })
    }

    fn lookup<'a>(&'a self, req: &'a PeerRequest) -> Looking<'a> {
        Box::pin(async move {
            let hosts = HashSet::from([req.host().to_owned()]);
            let held = self.tunnels.routes(&hosts).remove(req.host());
            // Only the route asked for: the answer stays far below a reply's 512 bytes.
            let route = held.and_then(|mut entry| {
                match route_of(req) {
                    Route::Http => entry.tcp.clear(),
                    Route::Tcp(port) => {
                        entry.http = 0;
                        entry.tcp.retain(|p, _| *p == port);
                    }
                }
                (entry.http > 0 || !entry.tcp.is_empty()).then_some(entry)
            });
            let no_route = || (Status::NoRoute, "no tunnel for this host here".to_owned());
            let entry = route.ok_or_else(no_route)?;
            let json = encode_route(&entry).map_err(|e| (Status::OpenFailed, e.to_string()))?;
            String::from_utf8(json).map_err(|_| no_route())
        })
    }

    fn store_up(&self) -> bool {
        (self.store_up)()
    }

    fn list(&self) -> Vec<u8> {
        let mut routes: Vec<_> = self.tunnels.all().into_iter().collect();
        routes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut body = Vec::new();
        for (host, entry) in routes {
            let Ok(json) = encode_route(&entry) else { continue };
            if body.len() + host.len() + json.len() + 2 > MAX_LIST {
                tracing::warn!(bytes = MAX_LIST, "a peer's list is cut at its size limit");
                break;
            }
            body.extend_from_slice(host.as_bytes());
            body.push(b' ');
            body.extend_from_slice(&json);
            body.push(b'\n');
        }
        body
    }

    fn kill<'a>(&'a self, req: &'a PeerRequest) -> Killing<'a> {
        Box::pin(async move {
            let doomed: Vec<_> = self
                .tunnels
                .snapshot()
                .into_iter()
                .filter(|(k, _)| k.host == req.host())
                .flat_map(|(_, members)| members)
                .collect();
            for m in &doomed {
                tracing::info!(
                    host = req.host(),
                    conn = m.conn,
                    sender = req.sender(),
                    "tunnel removed by the admin API of another replica"
                );
                crate::ssh::disconnect(&m.handle, "tunnel removed by the operator").await;
            }
            Ok(u32::try_from(doomed.len()).unwrap_or(u32::MAX))
        })
    }
}

/// The route a request names: HTTP for `dial_http` (and a lookup of port 0), else the TCP port.
fn route_of(req: &PeerRequest) -> Route {
    match (req.op(), req.port()) {
        (Op::DialHttp | Op::DialH2c | Op::DialTls, _) | (Op::Lookup, 0) => Route::Http,
        (_, port) => Route::Tcp(u32::from(port)),
    }
}

/// The members a peer may open for the visitor at `source` with `op`: those whose app is spoken
/// to as the op says (a peer sends HTTP/1.1 only to HTTP/1.1 members, TLS only to passthrough
/// ones), once their options are known. HTTP members must have no access rule (the peer cannot
/// check them); passthrough ones are checked here, `allow` and rate, against the visitor.
async fn admit_peer(
    members: Vec<Reach>,
    op: Op,
    source: std::net::IpAddr,
) -> Result<Vec<Reach>, (Status, String)> {
    let wanted = match op {
        Op::DialH2c => Upstream::H2c,
        Op::DialTls => Upstream::Passthrough,
        _ => Upstream::Http1,
    };
    let (mut admitted, mut passthrough, mut guarded) = (Vec::new(), Vec::new(), false);
    for m in members {
        let Reach::Local(local) = &m else { continue };
        match local.gate.ready(crate::rules::SETTLE_WITHIN).await {
            Some(rules) if rules.upstream != wanted => {}
            Some(rules) if wanted == Upstream::Passthrough => {
                passthrough.push((local.clone(), rules));
                admitted.push(m);
            }
            Some(rules) if rules.open_to_peers() => admitted.push(m),
            _ => guarded = true,
        }
    }
    if guarded {
        let why = "this tunnel has access rules, applied only on the replica its client is connected to";
        return Err((Status::OpenFailed, why.to_owned()));
    }
    if admitted.is_empty() {
        let why = format!("no member here takes a {} stream", op.label());
        return Err((Status::OpenFailed, why));
    }
    if !passthrough.is_empty() {
        crate::passthrough::admit(&passthrough, source.to_canonical())
            .map_err(|e| (Status::OpenFailed, format!("refused by the tunnel's rules: {e}")))?;
    }
    Ok(admitted)
}
