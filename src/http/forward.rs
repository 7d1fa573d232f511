//! Header rewriting between the visitor and the tunnel: hop-by-hop headers removed, and the real
//! client made known through `X-Forwarded-*`, `X-Real-IP` and `Forwarded` (RFC 7239), written
//! from what the gateway knows and never taken from the visitor (unless it is a trusted forwarder).

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// RFC 9110 §7.6.1 hop-by-hop headers, plus the legacy ones proxies still meet.
pub(super) fn hop_by_hop() -> [HeaderName; 9] {
    [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ]
}

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
    for name in hop_by_hop() {
        headers.remove(name);
    }
    if let (true, Some(upgrade)) = (keep_upgrade, upgrade) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// What the gateway itself knows about a request, the only source of the forwarding headers a
/// visitor cannot be believed on.
pub(super) struct Origin<'a> {
    /// Who sent the request: the TCP peer, or the client a trusted PROXY header named.
    pub(super) client: IpAddr,
    /// The host the request was routed by (lowercase, without port).
    pub(super) host: &'a str,
    /// The port the gateway is reached on from outside (`public_port`).
    pub(super) port: u16,
}

/// The headers that tell a backend who the client is and how it came; a visitor can write any of
/// them, so each is set here from the [`Origin`].
pub(super) fn forwarding() -> [HeaderName; 6] {
    [
        HeaderName::from_static(X_FORWARDED_FOR),
        header::FORWARDED,
        HeaderName::from_static(X_REAL_IP),
        HeaderName::from_static(X_FORWARDED_PROTO),
        HeaderName::from_static(X_FORWARDED_HOST),
        HeaderName::from_static(X_FORWARDED_PORT),
    ]
}
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_REAL_IP: &str = "x-real-ip";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_FORWARDED_HOST: &str = "x-forwarded-host";
const X_FORWARDED_PORT: &str = "x-forwarded-port";

/// Other headers that frameworks and CDNs read as the client's address. The gateway does not
/// write them; from an untrusted sender they are dropped, so a visitor cannot claim an address
/// through them either.
pub(super) fn client_claims() -> [HeaderName; 7] {
    [
        HeaderName::from_static("true-client-ip"),
        HeaderName::from_static("cf-connecting-ip"),
        HeaderName::from_static("x-client-ip"),
        HeaderName::from_static("client-ip"),
        HeaderName::from_static("x-cluster-client-ip"),
        HeaderName::from_static("fastly-client-ip"),
        HeaderName::from_static("x-original-forwarded-for"),
    ]
}

/// Sets the forwarding headers from `origin`, always with proto `https` (the gateway proxies only
/// requests it decrypted). From an untrusted sender every incoming one is dropped first: they are
/// the visitor's own claims. From a `trusted` forwarder (a proxy in front of the gateway), its
/// `X-Forwarded-For` and `Forwarded` chains are kept with the sender appended, and its
/// `X-Real-IP` and `X-Forwarded-Proto`/`-Host`/`-Port` stand: it saw the original request.
pub(super) fn set_forwarding(headers: &mut HeaderMap, origin: &Origin<'_>, trusted: bool) {
    let ip = origin.client.to_canonical();
    let (chain, elements) = if trusted {
        (
            joined(headers, X_FORWARDED_FOR),
            joined(headers, header::FORWARDED),
        )
    } else {
        for name in forwarding().into_iter().chain(client_claims()) {
            headers.remove(name);
        }
        (None, None)
    };
    let ip_text = ip.to_string();
    let element = format!(
        "for={};host={};proto=https",
        forwarded_node(ip, &ip_text),
        quote_if_needed(origin.host)
    );
    set(
        headers,
        HeaderName::from_static(X_FORWARDED_FOR),
        &appended(chain, &ip_text),
    );
    set(headers, header::FORWARDED, &appended(elements, &element));
    if !headers.contains_key(X_REAL_IP) {
        set(headers, HeaderName::from_static(X_REAL_IP), &ip_text);
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        let https = HeaderValue::from_static("https");
        headers.insert(HeaderName::from_static(X_FORWARDED_PROTO), https);
    }
    if !headers.contains_key(X_FORWARDED_HOST) {
        set(headers, HeaderName::from_static(X_FORWARDED_HOST), origin.host);
    }
    if !headers.contains_key(X_FORWARDED_PORT) {
        let port = HeaderValue::from(origin.port);
        headers.insert(HeaderName::from_static(X_FORWARDED_PORT), port);
    }
}

/// Every value of `name` as one comma-separated list (a header may come on several lines);
/// `None` when there is none, or none that is text.
fn joined(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn appended(list: Option<String>, item: &str) -> String {
    match list {
        Some(list) => format!("{list}, {item}"),
        None => item.to_owned(),
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// RFC 7239 §6: IPv6 nodes are bracketed and quoted.
fn forwarded_node(ip: IpAddr, text: &str) -> String {
    match ip {
        IpAddr::V4(_) => text.to_owned(),
        IpAddr::V6(_) => format!("\"[{text}]\""),
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

    fn origin(client: &str, host: &'static str) -> Origin<'static> {
        Origin {
            client: client.parse().unwrap(),
            host,
            port: 443,
        }
    }

    /// Everything a visitor may claim about itself.
    fn forged() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.1"),
            ("forwarded", "for=203.0.113.9;proto=http"),
            ("x-real-ip", "203.0.113.9"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "80"),
            ("true-client-ip", "203.0.113.9"),
            ("cf-connecting-ip", "203.0.113.9"),
        ] {
            h.append(name, HeaderValue::from_static(value));
        }
        h.insert("accept", HeaderValue::from_static("*/*"));
        h
    }

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn a_visitors_forwarding_headers_are_replaced() {
        let mut h = forged();
        set_forwarding(&mut h, &origin("::ffff:127.0.0.5", "a.gw.test"), false);
        let want = [
            ("x-forwarded-for", "127.0.0.5"),
            ("forwarded", "for=127.0.0.5;host=a.gw.test;proto=https"),
            ("x-real-ip", "127.0.0.5"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "a.gw.test"),
            ("x-forwarded-port", "443"),
        ];
        for (name, value) in want {
            assert_eq!(values(&h, name), [value], "{name}");
        }
        assert_eq!(h["accept"], "*/*", "other headers stay");
        assert_eq!(h.len(), want.len() + 1);
    }

    #[test]
    fn a_trusted_forwarders_chain_is_kept_and_the_sender_appended() {
        let mut h = forged();
        set_forwarding(&mut h, &origin("10.0.0.7", "a.gw.test"), true);
        assert_eq!(
            values(&h, "x-forwarded-for"),
            ["203.0.113.9, 198.51.100.1, 10.0.0.7"]
        );
        assert_eq!(
            values(&h, "forwarded"),
            ["for=203.0.113.9;proto=http, for=10.0.0.7;host=a.gw.test;proto=https"]
        );
        for (name, value) in [
            ("x-real-ip", "203.0.113.9"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "80"),
            ("true-client-ip", "203.0.113.9"),
            ("cf-connecting-ip", "203.0.113.9"),
        ] {
            assert_eq!(values(&h, name), [value], "{name} from the forwarder stands");
        }
        let mut h = HeaderMap::new();
        set_forwarding(&mut h, &origin("10.0.0.7", "a.gw.test"), true);
        assert_eq!(values(&h, "x-forwarded-for"), ["10.0.0.7"]);
        assert_eq!(
            values(&h, "x-real-ip"),
            ["10.0.0.7"],
            "what it left out is filled in"
        );
        assert_eq!(values(&h, "x-forwarded-port"), ["443"]);
    }

    #[test]
    fn ipv6_and_odd_hosts_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        set_forwarding(&mut h, &origin("2001:db8::1", "a:8443"), false);
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";host=\"a:8443\";proto=https"
        );
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["x-real-ip"], "2001:db8::1");
    }
}
