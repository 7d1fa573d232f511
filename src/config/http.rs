//! `[http]`: the reverse proxy's settings.

use std::net::IpAddr;
use std::time::Duration;

use hyper::header::HeaderName;
use hyper::http::uri::PathAndQuery;
use hyper::Uri;
use ipnet::IpNet;
use serde::Deserialize;

use super::{parse_cidr, Collector, Rate};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    #[serde(default)]
    pub trusted_forwarders: Vec<String>,
    pub forward_auth: Option<RawForwardAuth>,
    #[serde(default)]
    pub access: RawAccess,
}

/// `[http.access]`: the operator's bounds on the rules owners choose.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    #[serde(default)]
    pub require_protection: bool,
    pub max_rate: Option<String>,
    #[serde(default)]
    pub allow: Vec<String>,
}

/// The operator's bounds on tunnel access rules: owners may tighten, never loosen.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// Every tunnel needs `auth=` or `private` (or `forward_auth` covers it).
    pub require_protection: bool,
    /// The highest `rate=` an owner may choose, and the one a tunnel without `rate=` gets.
    pub max_rate: Option<Rate>,
    /// Client networks every tunnel is limited to; an owner's `allow=` must lie within.
    pub allow: Vec<IpNet>,
}

/// `[http.forward_auth]`: an auth service every tunnel request is first shown to.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForwardAuth {
    pub url: String,
    #[serde(default)]
    pub response_headers: Vec<String>,
    pub timeout: Option<String>,
}

/// Default time the auth service gets to answer.
const FORWARD_AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `forward_auth` asks, split for a plain HTTP/1.1 request (`http://` only: the auth
/// service runs beside the gateway, as oauth2-proxy and Authelia do behind Traefik).
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    /// `host:port` to connect to.
    pub address: String,
    /// The `Host` header sent.
    pub authority: String,
    pub path_and_query: PathAndQuery,
    /// Headers of a 2xx answer copied onto the request (and never taken from the visitor).
    pub response_headers: Vec<HeaderName>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// Senders (the client address after PROXY) whose `X-Forwarded-*`, `Forwarded` and
    /// `X-Real-IP` headers are believed. Empty (the default): nobody's.
    pub trusted_forwarders: Vec<IpNet>,
    pub forward_auth: Option<ForwardAuthConfig>,
    pub access: AccessConfig,
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
    let forward_auth = raw.forward_auth.as_ref().and_then(|f| forward_auth(c, f));
    let mut allow = Vec::new();
    for (i, cidr) in raw.access.allow.iter().enumerate() {
        match parse_cidr(cidr) {
            Ok(net) => allow.push(net.trunc()),
            Err(msg) => c.push(format!("http.access.allow[{i}]"), msg),
        }
    }
    let max_rate = raw.access.max_rate.as_deref().and_then(|r| {
        let parsed = Rate::parse(r.trim());
        if parsed.is_none() {
            c.push(
                "http.access.max_rate",
                format!("{r:?} is not a rate like \"100/s\" or \"600/m\""),
            );
        }
        parsed
    });
    HttpConfig {
        trusted_forwarders,
        forward_auth,
        access: AccessConfig {
            require_protection: raw.access.require_protection,
            max_rate,
            allow,
        },
    }
}

fn forward_auth(c: &mut Collector, raw: &RawForwardAuth) -> Option<ForwardAuthConfig> {
    let timeout = c.duration(
        "http.forward_auth.timeout",
        raw.timeout.as_deref(),
        FORWARD_AUTH_TIMEOUT,
    );
    let mut response_headers = Vec::new();
    for (i, name) in raw.response_headers.iter().enumerate() {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => response_headers.push(n),
            Err(_) => c.push(
                format!("http.forward_auth.response_headers[{i}]"),
                format!("{name:?} is not a header name"),
            ),
        }
    }
    let uri: Uri = match raw.url.parse() {
        Ok(u) => u,
        Err(e) => {
            c.push("http.forward_auth.url", format!("{:?}: {e}", raw.url));
            return None;
        }
    };
    let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        c.push(
            "http.forward_auth.url",
            format!(
                "{:?} must be an http:// URL with a host (the auth service beside the gateway)",
                raw.url
            ),
        );
        return None;
    };
    let address = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
    Some(ForwardAuthConfig {
        address,
        authority: authority.to_string(),
        path_and_query: uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        response_headers,
        timeout,
    })
}
