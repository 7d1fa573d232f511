//! Header rewriting between the visitor and the tunnel: hop-by-hop headers removed, and the real
//! client made known through `X-Forwarded-*` and `Forwarded` (RFC 7239).

use std::net::{IpAddr, SocketAddr};

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// RFC 9110 §7.6.1 hop-by-hop headers, plus the legacy ones proxies still meet.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether the request asks for a protocol upgrade (WebSocket): its `Connection`/`Upgrade` must
/// then travel on.
pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers and the ones `Connection` names. With `keep_upgrade`, `Connection:
/// upgrade` and `Upgrade` stay (normalised) so the upgrade can happen end to end.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = headers.get(header::UPGRADE).cloned();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if let (true, Some(upgrade)) = (keep_upgrade, upgrade) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Adds the proxy headers: `X-Forwarded-For` appended, `X-Forwarded-Proto`/`-Host` set, and an
/// RFC 7239 `Forwarded` element appended.
pub(super) fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, host: &str, proto: &str) {
    let ip = client.ip().to_canonical();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip.to_string(),
    };
    set(headers, "x-forwarded-for", &xff);
    set(headers, "x-forwarded-proto", proto);
    set(headers, "x-forwarded-host", host);
    let element = format!(
        "for={};host={};proto={proto}",
        forwarded_node(ip),
        quote_if_needed(host)
    );
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {element}"),
        _ => element,
    };
    set(headers, "forwarded", &forwarded);
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// RFC 7239 §6: IPv6 nodes are bracketed and quoted.
fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

fn quote_if_needed(value: &str) -> String {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if value.bytes().all(token) {
        value.to_string()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        add_forwarded(
            &mut h,
            "[::ffff:127.0.0.5]:5000".parse().unwrap(),
            "a.gw.test",
            "https",
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.gw.test");
        assert_eq!(h["forwarded"], "for=127.0.0.5;host=a.gw.test;proto=https");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "[2001:db8::1]:443".parse().unwrap(), "a:8443", "https");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";host=\"a:8443\";proto=https"
        );
    }
}
