//! TLS passthrough by SNI (`tls=passthrough`): a ClientHello naming such a tunnel's host is not
//! answered here. Its bytes, the ClientHello included, go raw into a `forwarded-tcpip` channel,
//! so the owner's server and certificate terminate TLS and the gateway never sees the traffic.
//!
//! The decision is made from the ClientHello alone, before any certificate is chosen, and waits
//! for the owner's options like an HTTP request does (a tunnel meant to be passed through is
//! never briefly terminated), within the TLS stage's own deadline. Only the rules that need no HTTP apply: `allow`, and the
//! operator's rate, counted per TLS connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::io::{BoxStream, ClientAddr, ClientKey};
use crate::rules::{Bucket, GateState, Rules, Upstream};
use crate::tunnels::{first_member, Directory, Member, Opened, Reach, Route, TunnelKey, Tunnels, Visitor};

/// Buffer of each direction of the splice: the size of a full TLS record, so one read can
/// carry one.
const SPLICE_BUFFER: usize = 16 * 1024 + 256;

/// A host served by passthrough: the members here that serve it that way, with their rules,
/// and those other replicas hold (checked by their own replica).
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) host: String,
    members: Vec<(Arc<Member>, Arc<Rules>)>,
    remote: Vec<Reach>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PassthroughError {
    #[error("client address not in the tunnel's allow list")]
    Address,
    #[error("over the tunnel's rate of new connections")]
    Rate,
    #[error("no tunnel client accepted a channel")]
    Unavailable,
    #[error("spliced stream ended: {0}")]
    Io(#[from] std::io::Error),
}

impl PassthroughError {
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Address => "allow",
            Self::Rate => "rate",
            Self::Unavailable => "unavailable",
            Self::Io(_) => "io",
        }
    }
}

/// Whether `sni` names a tunnel host whose members pass TLS through: those here, waiting at most
/// `wait` for options still on their way, else those other replicas published as passthrough
/// (their replica checks their rules when asked to open one).
pub(crate) async fn find(
    (tunnels, directory): (&Tunnels, &dyn Directory),
    domain: &str,
    sni: &str,
    wait: Duration,
) -> Option<Target> {
    let host = crate::names::canonical_host(sni, domain)?;
    let key = TunnelKey {
        host,
        route: Route::Http,
    };
    // Nearly every handshake: no such pool, or all settled and terminated here (read in place:
    // the pool's round-robin turn is the HTTP requests').
    let maybe = |m: &Member| !matches!(m.gate.upstream(), Some(Upstream::Http1 | Upstream::H2c));
    if !tunnels.any_member(&key, maybe) {
        if tunnels.contains(&key) {
            return None;
        }
        // Held only on other replicas: passed through if one published that it passes TLS.
        let remote = directory.passthrough_members(&key);
        return (!remote.is_empty()).then_some(Target {
            host: key.host,
            members: Vec::new(),
            remote,
        });
    }
    let mut passthrough = false;
    for m in tunnels.members_in_place(&key) {
        let rules = m.gate.ready(wait).await;
        passthrough |= rules.is_some_and(|r| r.upstream == Upstream::Passthrough);
    }
    if !passthrough {
        return None;
    }
    // A passthrough pool: its own turn decides which member serves this connection.
    let members: Vec<_> = tunnels
        .members(&key)
        .into_iter()
        .filter_map(|m| match m.gate.state() {
            GateState::Ready(rules) if rules.upstream == Upstream::Passthrough => Some((m, rules)),
            _ => None,
        })
        .collect();
    (!members.is_empty()).then_some(Target {
        host: key.host,
        members,
        remote: Vec::new(),
    })
}

/// Lets `client` in if every distinct connection's rules among `members` do (a pool is as
/// strict as its strictest member): the addresses first, so a refused visitor takes no one's
/// rate. Also what the owner replica checks for a visitor another replica passes on.
pub(crate) fn admit(members: &[(Arc<Member>, Arc<Rules>)], client: IpAddr) -> Result<(), PassthroughError> {
    let mut distinct: Vec<&(Arc<Member>, Arc<Rules>)> = Vec::new();
    for m in members {
        if !distinct.iter().any(|d| Arc::ptr_eq(&d.0.gate, &m.0.gate)) {
            distinct.push(m);
        }
    }
    if distinct.iter().any(|(_, rules)| !rules.allows(client)) {
        return Err(refused(PassthroughError::Address));
    }
    for (member, rules) in distinct {
        let bucket = member
            .bucket
            .get_or_init(|| rules.rate.map(|r| Bucket::new(r, Instant::now())));
        if bucket.as_ref().is_some_and(|b| b.take(Instant::now()).is_err()) {
            return Err(refused(PassthroughError::Rate));
        }
    }
    Ok(())
}

/// Checks `client` against the members' rules, opens a channel to the first member that takes
/// one (the client's address as the originator) and splices `stream` into it both ways until
/// either side closes.
pub(crate) async fn serve(
    directory: &dyn Directory,
    target: Target,
    mut stream: BoxStream,
    client: &ClientAddr,
    open_timeout: Duration,
) -> Result<(), PassthroughError> {
    let ip = client.client.ip();
    admit(&target.members, ip)?;
    let members: Vec<Reach> = target
        .members
        .iter()
        .map(|(m, _)| Reach::Local(m.clone()))
        .chain(target.remote.iter().cloned())
        .collect();
    let origin = ip.to_canonical().to_string();
    let visitor = Visitor {
        origin: (origin.as_str(), u32::from(client.client.port())),
        client: ClientKey::of(ip),
        vpce: client.vpce.as_deref(),
        key: None,
    };
    let opened = first_member(&members, open_timeout, |m| async move {
        directory.open(&m, visitor).await
    })
    .await;
    let Some((
        Opened {
            stream: mut upstream, ..
        },
        member,
    )) = opened
    else {
        return Err(PassthroughError::Unavailable);
    };
    if let Some(m) = member.local() {
        m.stats
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    crate::metrics::upstream_request(Upstream::Passthrough.label());
    tracing::debug!(host = target.host, member = %member, "passing TLS through");
    tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut upstream, SPLICE_BUFFER, SPLICE_BUFFER)
        .await?;
    Ok(())
}

fn refused(e: PassthroughError) -> PassthroughError {
    crate::metrics::access_refused(e.reason());
    e
}
