//! The one JSON rendering of tunnels, for `ssh gw tunnels` (the caller's own) and the admin API
//! (all of them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{Member, Route, TunnelKey};

/// One tunnel: what it is, where to reach it, and the SSH connections serving it.
pub(crate) fn tunnel_json(key: &TunnelKey, members: &[Arc<Member>], public_port: u16) -> Value {
    let first = members.first();
    let (port, url) = match key.route {
        Route::Http => (
            first.map_or(80, |m| m.bind_port),
            crate::names::https_origin(&key.host, public_port),
        ),
        Route::Tcp(p) => (p, format!("tcp://{}:{p}", key.host)),
    };
    let members: Vec<Value> = members.iter().map(|m| member_json(m)).collect();
    json!({
        "name": first.map(|m| m.name.as_str()).unwrap_or_default(),
        "host": key.host,
        "keyid": first.map(|m| m.key.key_id()).unwrap_or_default(),
        "key": first.map(|m| m.key.to_string()).unwrap_or_default(),
        "kind": key.route.kind(),
        "port": port,
        "url": url,
        "members": members,
    })
}

fn member_json(m: &Member) -> Value {
    let since = m.since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    json!({
        "connection": m.conn,
        "client": m.client.to_string(),
        "vpce_id": m.vpce,
        "connected_since": since,
        "connected_secs": SystemTime::now().duration_since(m.since).map_or(0, |d| d.as_secs()),
        "bytes_in": m.stats.bytes_in.load(Ordering::Relaxed),
        "bytes_out": m.stats.bytes_out.load(Ordering::Relaxed),
        "requests": m.stats.requests.load(Ordering::Relaxed),
    })
}

/// Every tunnel in `snapshot` that `keep` selects (by its first member), as `{"tunnels": […]}`.
pub(crate) fn tunnels_json(
    snapshot: &[(TunnelKey, Vec<Arc<Member>>)],
    public_port: u16,
    keep: impl Fn(&Member) -> bool,
) -> Value {
    let tunnels: Vec<Value> = snapshot
        .iter()
        .filter(|(_, members)| members.first().is_some_and(|m| keep(m)))
        .map(|(key, members)| tunnel_json(key, members, public_port))
        .collect();
    json!({ "tunnels": tunnels })
}
