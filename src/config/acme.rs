//! `[acme]`: automatic certificates.

use std::path::PathBuf;

use serde::Deserialize;

use super::Collector;

/// Let's Encrypt production; staging is https://acme-staging-v02.api.letsencrypt.org/directory.
pub(super) const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: Option<String>,
    #[serde(default)]
    pub contact: Vec<String>,
    #[serde(default)]
    pub domains: Vec<String>,
    pub challenge: Option<String>,
    pub root_ca: Option<PathBuf>,
    pub on_demand: Option<bool>,
    pub orders_per_hour: Option<usize>,
    pub orders_per_week: Option<usize>,
    pub on_demand_orders_per_week: Option<usize>,
    pub failed_validations_per_host_per_hour: Option<usize>,
}

/// Which ACME challenge proves control of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// Answered by the main listener when a ClientHello offers ALPN `acme-tls/1`.
    TlsAlpn01,
    /// Answered by plain HTTP (a port-80 listener) under `/.well-known/acme-challenge/`.
    Http01,
}

impl ChallengeKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::TlsAlpn01 => "tls-alpn-01",
            Self::Http01 => "http-01",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AcmeConfig {
    pub directory: String,
    pub contact: Vec<String>,
    pub domains: Vec<String>,
    pub challenge: ChallengeKind,
    pub root_ca: Option<PathBuf>,
    pub on_demand: bool,
    pub limits: OrderLimits,
}

pub(super) fn validate(c: &mut Collector, raw: &RawAcme) -> AcmeConfig {
    let directory = raw.directory.clone().unwrap_or_else(|| ACME_DIRECTORY.into());
    if !directory.starts_with("https://") {
        c.push("acme.directory", format!("{directory:?} is not an https:// URL"));
    }
    let challenge = match raw.challenge.as_deref() {
        None | Some("tls-alpn-01") => ChallengeKind::TlsAlpn01,
        Some("http-01") => ChallengeKind::Http01,
        Some(other) => {
            c.push(
                "acme.challenge",
                format!("{other:?} is not \"tls-alpn-01\" or \"http-01\""),
            );
            ChallengeKind::TlsAlpn01
        }
    };
    for (i, d) in raw.domains.iter().enumerate() {
        if !crate::names::is_domain(&d.to_ascii_lowercase()) {
            c.push(
                format!("acme.domains[{i}]"),
                format!("{d:?} is not a DNS name (wildcards need DNS-01)"),
            );
        }
    }
    for (i, contact) in raw.contact.iter().enumerate() {
        if !contact.starts_with("mailto:") {
            c.push(
                format!("acme.contact[{i}]"),
                format!("{contact:?} should be a mailto: URI"),
            );
        }
    }
    if let Some(root) = raw.root_ca.as_ref().filter(|p| !p.is_file()) {
        c.push(
            "acme.root_ca",
            format!("{} does not exist or is not a file", root.display()),
        );
    }
    let on_demand = raw.on_demand.unwrap_or(false);
    if raw.domains.is_empty() && !on_demand {
        c.push(
            "acme.domains",
            "list at least one domain, or set on_demand = true",
        );
    }
    AcmeConfig {
        directory,
        contact: raw.contact.clone(),
        domains: raw.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        challenge,
        root_ca: raw.root_ca.clone(),
        on_demand,
        limits: validate_limits(c, raw),
    }
}

fn validate_limits(c: &mut Collector, raw: &RawAcme) -> OrderLimits {
    let d = OrderLimits::default();
    let orders_per_week = raw.orders_per_week.unwrap_or(d.orders_per_week);
    // The configured domains keep the rest of the week's orders: random tunnel names must never
    // use up what the gateway's own certificates need to renew.
    let reserved = !raw.domains.is_empty();
    let on_demand_default = if reserved {
        orders_per_week * 2 / 3
    } else {
        orders_per_week
    };
    let on_demand_orders_per_week = raw.on_demand_orders_per_week.unwrap_or(on_demand_default);
    if reserved && on_demand_orders_per_week >= orders_per_week {
        c.push(
            "acme.on_demand_orders_per_week",
            format!(
                "must be below acme.orders_per_week ({orders_per_week}): the rest is kept for \
                 the certificates of acme.domains"
            ),
        );
    }
    OrderLimits {
        orders_per_hour: raw.orders_per_hour.unwrap_or(d.orders_per_hour),
        orders_per_week,
        on_demand_orders_per_week: on_demand_orders_per_week.min(orders_per_week),
        failures_per_host_per_hour: raw
            .failed_validations_per_host_per_hour
            .unwrap_or(d.failures_per_host_per_hour),
    }
}

/// Budgets kept below Let's Encrypt's rate limits (50 certificates per registered domain per
/// week, 300 new orders per 3 hours, 5 failed validations per host per hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderLimits {
    pub orders_per_hour: usize,
    pub orders_per_week: usize,
    /// The part of `orders_per_week` that on-demand orders (tunnel hosts) may use; the rest is
    /// kept for the configured domains.
    pub on_demand_orders_per_week: usize,
    pub failures_per_host_per_hour: usize,
}

impl Default for OrderLimits {
    fn default() -> Self {
        Self {
            orders_per_hour: 50,
            orders_per_week: 45,
            // Two thirds: 15 orders a week stay for the configured domains, which need one per
            // domain every 60 days and a few retries.
            on_demand_orders_per_week: 30,
            failures_per_host_per_hour: 4,
        }
    }
}
