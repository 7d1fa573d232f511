//! `[http]`: the reverse proxy's settings.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::{parse_cidr, Collector};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    #[serde(default)]
    pub trusted_forwarders: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// Senders (the client address after PROXY) whose `X-Forwarded-*`, `Forwarded` and
    /// `X-Real-IP` headers are believed. Empty (the default): nobody's.
    pub trusted_forwarders: Vec<IpNet>,
}

impl HttpConfig {
    /// Whether a request from `ip` may bring forwarding headers of its own.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        super::listener::contains(&self.trusted_forwarders, ip)
    }
}

pub(super) fn validate(c: &mut Collector, raw: &RawHttp) -> HttpConfig {
    let mut trusted_forwarders = Vec::new();
    for (i, cidr) in raw.trusted_forwarders.iter().enumerate() {
        match parse_cidr(cidr) {
            Ok(net) => trusted_forwarders.push(net),
            Err(msg) => c.push(format!("http.trusted_forwarders[{i}]"), msg),
        }
    }
    HttpConfig { trusted_forwarders }
}
