//! `[admin]`: the private admin listener, its bearer token and the Host names it answers to.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Collector;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: String,
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// Names (lowercase) and addresses a request's Host may carry besides loopback ones and the
    /// address the request arrived on.
    pub hosts: Vec<String>,
}

pub(super) fn validate(c: &mut Collector, raw: &RawAdmin) -> Option<AdminConfig> {
    let mut hosts = Vec::new();
    for (i, given) in raw.hosts.iter().enumerate() {
        let host = given.trim_end_matches('.').to_ascii_lowercase();
        let ip = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>();
        match ip {
            Ok(ip) => hosts.push(ip.to_canonical().to_string()),
            Err(_) if crate::names::is_domain(&host) => hosts.push(host),
            Err(_) => c.push(
                format!("admin.hosts[{i}]"),
                format!("{given:?} is not a host name or an IP address (without a port)"),
            ),
        }
    }
    let Ok(bind) = raw.bind.parse::<SocketAddr>() else {
        c.push("admin.bind", format!("{:?} is not an address:port", raw.bind));
        return None;
    };
    if raw.token_file.is_none() && !bind.ip().to_canonical().is_loopback() {
        c.push(
            "admin.token_file",
            format!(
                "required when admin.bind ({bind}) is not a loopback address: without a token, \
                 anyone who reaches it can read metrics and remove tunnels (make one with \
                 `openssl rand -hex 32`, in a file readable by edgemux only)"
            ),
        );
    }
    Some(AdminConfig {
        bind,
        token_file: raw.token_file.clone(),
        hosts,
    })
}
