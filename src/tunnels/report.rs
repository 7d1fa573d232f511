//! The one JSON rendering of tunnels, for `ssh gw tunnels` (the caller's own) and the admin API
//! (all of them).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{Directory, Member, RemoteTunnel, Route, TunnelKey};
use crate::names::KeyFingerprint;
use crate::rules::GateState;

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
        "channels": m.stats.open_channels.load(Ordering::Relaxed),
        "rules": match m.gate.state() {
            GateState::Pending => json!("pending"),
            GateState::Refused => json!("refused"),
            GateState::Ready(rules) => rules.summary(),
        },
    })
}

/// Every tunnel whose owner `keep` selects, as `{"tunnels": […]}`: this gateway's (`snapshot`),
/// with their members, and in a cluster other replicas' too (`directory`). Each tunnel says how
/// many members serve it in all (`member_count`) and, in a cluster, on which replicas.
pub(crate) fn tunnels_json(
    snapshot: &[(TunnelKey, Vec<Arc<Member>>)],
    directory: &dyn Directory,
    public_port: u16,
    keep: impl Fn(&KeyFingerprint) -> bool,
) -> Value {
    let mut remote: BTreeMap<TunnelKey, Vec<RemoteTunnel>> = BTreeMap::new();
    for t in directory.remote_tunnels().into_iter().filter(|t| keep(&t.owner)) {
        remote.entry(t.key.clone()).or_default().push(t);
    }
    let me = directory.replica_name();
    let mut tunnels = Vec::new();
    for (key, members) in snapshot {
        if !members.first().is_some_and(|m| keep(&m.key)) {
            continue;
        }
        let mut tunnel = tunnel_json(key, members, public_port);
        let elsewhere = remote.remove(key).unwrap_or_default();
        spread_json(&mut tunnel, me.map(|me| (me, members.len())), &elsewhere);
        tunnels.push(tunnel);
    }
    for (key, elsewhere) in remote {
        let Some(first) = elsewhere.first() else { continue };
        let mut tunnel = remote_json(&key, first.owner, public_port);
        spread_json(&mut tunnel, None, &elsewhere);
        tunnels.push(tunnel);
    }
    let mut list = json!({ "tunnels": tunnels });
    if let Some(freshness) = directory.freshness() {
        list["directory"] = freshness.into();
    }
    list
}

/// Adds `member_count` and, in a cluster, `replicas` (name and members of each) to `tunnel`.
fn spread_json(tunnel: &mut Value, here: Option<(&str, usize)>, elsewhere: &[RemoteTunnel]) {
    let local = here.map_or_else(|| tunnel["members"].as_array().map_or(0, Vec::len), |(_, n)| n);
    let remote: u64 = elsewhere.iter().map(|t| u64::from(t.members)).sum();
    tunnel["member_count"] = json!(local as u64 + remote);
    let Some(me) = here.map(|(me, _)| me).or_else(|| elsewhere.first().map(|_| "")) else {
        return;
    };
    let mut replicas: Vec<Value> = Vec::new();
    if !me.is_empty() {
        replicas.push(json!({ "replica": me, "members": local }));
    }
    replicas.extend(
        elsewhere
            .iter()
            .map(|t| json!({ "replica": t.replica, "members": t.members })),
    );
    tunnel["replicas"] = Value::Array(replicas);
}

/// A tunnel served only by other replicas: what the directory knows of it (no member details,
/// which stay on the replica that holds them).
fn remote_json(key: &TunnelKey, owner: KeyFingerprint, public_port: u16) -> Value {
    let keyid = owner.key_id();
    let (port, url) = match key.route {
        Route::Http => (80, crate::names::https_origin(&key.host, public_port)),
        Route::Tcp(p) => (p, format!("tcp://{}:{p}", key.host)),
    };
    let label = key.host.split('.').next().unwrap_or_default();
    let name = label.strip_suffix(&format!("-{keyid}")).unwrap_or(label);
    json!({
        "name": name,
        "host": key.host,
        "keyid": keyid,
        "key": owner.to_string(),
        "kind": key.route.kind(),
        "port": port,
        "url": url,
        "members": [],
    })
}
