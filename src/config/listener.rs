//! `[[listener]]`: where edgemux listens, and from whom it reads a PROXY protocol header.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::Collector;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub bind: String,
    #[serde(default)]
    pub proxy_protocol: Option<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Accept SSH without TLS on this port (default true).
    pub plain_ssh: Option<bool>,
}

/// Whether a listener expects a PROXY protocol header in front of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Off,
    Optional,
    Required,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub bind: SocketAddr,
    pub proxy_protocol: ProxyMode,
    pub trusted_proxies: Vec<IpNet>,
    pub plain_ssh: bool,
}

impl ListenerConfig {
    /// Whether `ip` may send a PROXY header (IPv4-mapped IPv6 peers match IPv4 CIDRs).
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        contains(&self.trusted_proxies, ip)
    }
}

/// Whether `ip` is in one of `nets`; an IPv4-mapped IPv6 address matches IPv4 CIDRs.
pub(super) fn contains(nets: &[IpNet], ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|net| net.contains(&ip))
}

pub(super) fn validate(c: &mut Collector, i: usize, l: &RawListener) -> Option<ListenerConfig> {
    let at = |key: &str| format!("listener[{i}].{key}");
    let bind = l
        .bind
        .parse::<SocketAddr>()
        .map_err(|_| c.push(at("bind"), format!("{:?} is not an address:port", l.bind)))
        .ok();
    let proxy_protocol = match l.proxy_protocol.as_deref() {
        None | Some("off") => ProxyMode::Off,
        Some("optional") => ProxyMode::Optional,
        Some("required") => ProxyMode::Required,
        Some(other) => {
            c.push(
                at("proxy_protocol"),
                format!("{other:?} is not one of \"off\", \"optional\", \"required\""),
            );
            ProxyMode::Off
        }
    };
    let mut trusted_proxies = Vec::new();
    for (j, cidr) in l.trusted_proxies.iter().enumerate() {
        match parse_cidr(cidr) {
            Ok(net) => trusted_proxies.push(net),
            Err(msg) => c.push(format!("listener[{i}].trusted_proxies[{j}]"), msg),
        }
    }
    if proxy_protocol != ProxyMode::Off && trusted_proxies.is_empty() {
        c.push(
            at("trusted_proxies"),
            "proxy_protocol is enabled but no trusted_proxies are listed: every header would be refused",
        );
    }
    Some(ListenerConfig {
        bind: bind?,
        proxy_protocol,
        trusted_proxies,
        plain_ssh: l.plain_ssh.unwrap_or(true),
    })
}

/// Accepts `10.0.0.0/16` as well as a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.0.0.0/16) or an IP address"))
}
