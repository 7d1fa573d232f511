//! Configuration: the TOML schema (strict, `deny_unknown_fields`) and its validation into typed values.
//!
//! Parsing never stops at the first problem: [`validate`] collects every problem with its key path so
//! `edgemux check` can print them all at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod acme;
mod admin;
mod cluster;
mod http;
mod limits;
mod listener;
mod rate;
mod ssh;
pub use acme::{AcmeConfig, ChallengeKind, OrderLimits, RawAcme};
pub use admin::{AdminConfig, RawAdmin};
pub use cluster::{cluster_defaults, ClusterConfig, PeerTlsFiles, RawCluster, Spread, StoreKind, StoreTls};
pub use http::{AccessConfig, ForwardAuthConfig, HttpConfig, RawHttp};
pub use limits::{Limits, LiveLimits, RawLimits};
pub use listener::{parse_cidr, ListenerConfig, ProxyMode, RawListener};
pub use rate::{Rate, RateUnit, MAX_RATE};
pub use ssh::{Grant, RawGrant, RawReserve, RawSsh, SshConfig};

/// Largest config file we read; a config is a few KiB, anything bigger is a mistake.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The raw file, exactly as written. Every field has a documented default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub domain: String,
    /// Port shown in tunnel URLs; default: the first listener's port (443 is omitted from URLs).
    pub public_port: Option<u16>,
    #[serde(default)]
    pub listener: Vec<RawListener>,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub ssh: RawSsh,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub http: RawHttp,
    pub admin: Option<RawAdmin>,
    pub acme: Option<RawAcme>,
    /// Absent: a single node (no store, no peer listener).
    pub cluster: Option<RawCluster>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certs_dir: Option<PathBuf>,
    /// A CA that mints certificates for tunnel hosts on first use (development, private CAs).
    pub local_ca: Option<RawCertificate>,
    #[serde(default)]
    pub certificate: Vec<RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct CertificatePaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub domain: String,
    pub public_port: u16,
    pub listeners: Vec<ListenerConfig>,
    pub certs_dir: PathBuf,
    pub certificates: Vec<CertificatePaths>,
    pub local_ca: Option<CertificatePaths>,
    pub ssh: SshConfig,
    pub limits: Limits,
    pub http: HttpConfig,
    pub admin: Option<AdminConfig>,
    pub acme: Option<AcmeConfig>,
    pub cluster: Option<ClusterConfig>,
}

/// Defaults, with their units, in one place.
pub mod defaults {
    use std::time::Duration;
    pub const CERTS_DIR: &str = "/var/lib/edgemux";
    /// 15 s × 3 unanswered probes: a vanished client's tunnels are gone within a minute.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
    pub const KEEPALIVE_MAX: usize = 3;
    /// The largest flow window a channel grows to: 8 MiB keeps a 100 ms × 640 Mbit/s path full;
    /// a window starts small and grows only while its reader keeps up (`ssh::pump`).
    pub const CHANNEL_BUFFER: usize = 8 * 1024 * 1024;
    /// Twice this bounds `ssh.channel_buffer`: 16 MiB fills a 200 ms × 640 Mbit/s path, and more
    /// would only let one reader pin more.
    pub const SSH_WINDOW: u32 = 8 * 1024 * 1024;
}

/// One problem found in a config, with the key path it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{}", format_problems(.0))]
    Invalid(Vec<Problem>),
}

fn format_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(&text).map_err(ConfigError::Invalid)
}

/// Parses TOML text and validates it; pure, so it is fuzzed and unit-tested.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let de = toml::Deserializer::new(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| vec![toml_problem(&e)])?;
    validate(raw)
}

/// A syntax or schema error with the key path it happened at (`ssh.keepalive_maxx`).
fn toml_problem(e: &serde_path_to_error::Error<toml::de::Error>) -> Problem {
    let inner = e.inner();
    let message = inner.message().trim().to_string();
    let path = e.path().to_string();
    let at = inner
        .span()
        .map(|s| format!(" (at byte {})", s.start))
        .unwrap_or_default();
    Problem {
        path: if path == "." { "(file)".into() } else { path },
        message: message + &at,
    }
}

pub(crate) struct Collector(Vec<Problem>);

impl Collector {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(crate) fn duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(msg)) => {
                self.push(path, msg);
                default
            }
        }
    }
}

/// Validates a parsed file into a [`Config`], reporting every problem.
pub fn validate(raw: RawConfig) -> Result<Config, Vec<Problem>> {
    let mut c = Collector(Vec::new());
    let domain = raw.domain.trim_end_matches('.').to_ascii_lowercase();
    if !crate::names::is_domain(&domain) {
        c.push("domain", format!("{:?} is not a valid DNS name", raw.domain));
    }
    if raw.listener.is_empty() {
        c.push("listener", "at least one [[listener]] is required");
    }
    let listeners: Vec<ListenerConfig> = raw
        .listener
        .iter()
        .enumerate()
        .filter_map(|(i, l)| listener::validate(&mut c, i, l))
        .collect();
    let public_port = raw
        .public_port
        .or_else(|| listeners.first().map(|l| l.bind.port()))
        .unwrap_or(443);
    let ssh = ssh::validate(&mut c, &raw.ssh, raw.tls.certs_dir.as_deref());
    let limits = limits::validate(&mut c, &raw.limits);
    let http = http::validate(&mut c, &raw.http);
    let admin = raw.admin.as_ref().and_then(|a| admin::validate(&mut c, a));
    let cert_files = raw
        .tls
        .certificate
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("tls.certificate[{i}]"), c));
    for (at, cert) in cert_files.chain(raw.tls.local_ca.iter().map(|c| ("tls.local_ca".to_string(), c))) {
        for (key, path) in [("cert", &cert.cert), ("key", &cert.key)] {
            if !path.is_file() {
                c.push(
                    format!("{at}.{key}"),
                    format!("{} does not exist or is not a file", path.display()),
                );
            }
        }
    }
    let acme = raw.acme.as_ref().map(|a| acme::validate(&mut c, a));
    let cluster = raw.cluster.as_ref().and_then(|r| cluster::validate(&mut c, r));
    if !c.0.is_empty() {
        return Err(c.0);
    }
    let certs_dir = certs_dir_or_default(raw.tls.certs_dir.as_deref());
    Ok(Config {
        domain,
        public_port,
        listeners,
        certs_dir,
        certificates: raw
            .tls
            .certificate
            .into_iter()
            .map(|r| CertificatePaths {
                cert: r.cert,
                key: r.key,
            })
            .collect(),
        local_ca: raw.tls.local_ca.map(|r| CertificatePaths {
            cert: r.cert,
            key: r.key,
        }),
        ssh,
        limits,
        http,
        admin,
        acme,
        cluster,
    })
}

pub(super) fn certs_dir_or_default(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(defaults::CERTS_DIR))
}

/// Parses `"250ms"`, `"2s"`, `"5m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let bad = || format!("{s:?} is not a duration like \"500ms\", \"2s\", \"5m\" or \"1h\"");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = |mul: u64| n.checked_mul(mul).map(Duration::from_secs).ok_or_else(bad);
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const GOOD: &str = r#"
domain = "gw.example.com"
[[listener]]
bind = "127.0.0.1:8443"
[ssh]
keepalive_interval = "5s"
"#;

    #[test]
    fn good_config_gets_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.domain, "gw.example.com");
        assert_eq!(c.public_port, 8443);
        assert_eq!(c.listeners[0].proxy_protocol, ProxyMode::Off);
        assert!(c.listeners[0].plain_ssh);
        assert_eq!(c.ssh.keepalive_interval, Duration::from_secs(5));
        assert_eq!(c.limits.sniff_timeout, limits::SNIFF_TIMEOUT);
    }

    #[test]
    fn unknown_key_is_refused_with_its_path() {
        let head = "domain = \"a.b\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n";
        let err = parse(&format!("bogus = 1\n{head}")).unwrap_err();
        assert_eq!(err[0].path, "bogus", "{err:?}");
        let err = parse(&format!("{head}[ssh]\nkeepalive_maxx = 1")).unwrap_err();
        assert_eq!(err[0].path, "ssh.keepalive_maxx", "{err:?}");
        let err = parse("domain = \"a.b\"\n[[listener]]\nbind = 5").unwrap_err();
        assert_eq!(err[0].path, "listener[0].bind", "{err:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
domain = "not a domain"
[[listener]]
bind = "nowhere"
proxy_protocol = "sometimes"
trusted_proxies = ["10.0.0.0/33"]
[ssh]
keepalive_interval = "soon"
[limits]
sniff_timeout = "1 fortnight"
"#;
        let paths: Vec<String> = parse(text).unwrap_err().into_iter().map(|p| p.path).collect();
        for want in [
            "domain",
            "listener[0].bind",
            "listener[0].proxy_protocol",
            "listener[0].trusted_proxies[0]",
            "ssh.keepalive_interval",
            "limits.sniff_timeout",
        ] {
            assert!(paths.iter().any(|p| p == want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn proxy_protocol_without_trusted_proxies_is_refused() {
        let text = "domain = \"a.b\"\n[[listener]]\nbind = \"127.0.0.1:1\"\nproxy_protocol = \"required\"";
        let err = parse(text).unwrap_err();
        assert_eq!(err[0].path, "listener[0].trusted_proxies");
    }

    const ADMIN_HEAD: &str = "domain = \"a.b\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n[admin]\n";

    #[test]
    fn admin_hosts_are_names_or_addresses() {
        let text = format!(
            "{ADMIN_HEAD}bind = \"127.0.0.1:9090\"\nhosts = [\"Admin.Internal.\", \"[::1]\", \"10.0.0.5\", \"a:80\"]"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].path, "admin.hosts[3]");
        let text = format!("{ADMIN_HEAD}bind = \"127.0.0.1:9090\"\nhosts = [\"Admin.Internal.\", \"[::1]\"]");
        let admin = parse(&text).unwrap().admin.unwrap();
        assert_eq!(admin.hosts, ["admin.internal", "::1"]);
    }

    #[test]
    fn admin_off_loopback_needs_a_token() {
        let err = parse(&format!("{ADMIN_HEAD}bind = \"0.0.0.0:9090\"")).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].path, "admin.token_file");
        assert!(err[0].message.contains("0.0.0.0:9090"), "{err:?}");
        for bind in ["127.0.0.1:9090", "[::1]:9090", "[::ffff:127.0.0.1]:9090"] {
            assert!(parse(&format!("{ADMIN_HEAD}bind = \"{bind}\"")).is_ok(), "{bind}");
        }
        let with_token = format!("{ADMIN_HEAD}bind = \"0.0.0.0:9090\"\ntoken_file = \"/t\"");
        assert!(parse(&with_token).is_ok());
    }

    #[test]
    fn trusted_forwarders_are_cidrs_and_trust_nobody_by_default() {
        let head = "domain = \"a.b\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n";
        let c = parse(head).unwrap();
        assert!(!c.http.trusts("127.0.0.1".parse().unwrap()));
        let c = parse(&format!(
            "{head}[http]\ntrusted_forwarders = [\"10.0.0.0/8\", \"::1\"]"
        ))
        .unwrap();
        assert!(c.http.trusts("10.2.3.4".parse().unwrap()));
        assert!(c.http.trusts("::ffff:10.2.3.4".parse().unwrap()));
        assert!(c.http.trusts("::1".parse().unwrap()));
        assert!(!c.http.trusts("11.0.0.1".parse().unwrap()));
        let err = parse(&format!(
            "{head}[http]\ntrusted_forwarders = [\"10.0.0.0/8\", \"ten\"]"
        ))
        .unwrap_err();
        assert_eq!(err[0].path, "http.trusted_forwarders[1]");
    }

    #[test]
    fn forward_auth_takes_a_plain_http_url_and_header_names() {
        let head = "domain = \"a.b\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n[http.forward_auth]\n";
        let c = parse(&format!(
            "{head}url = \"http://auth.local:4180/oauth2/auth?x=1\"\nresponse_headers = [\"X-Auth-Request-User\"]"
        ))
        .unwrap();
        let f = c.http.forward_auth.unwrap();
        assert_eq!(
            (f.address.as_str(), f.authority.as_str()),
            ("auth.local:4180", "auth.local:4180")
        );
        assert_eq!(f.path_and_query.as_str(), "/oauth2/auth?x=1");
        assert_eq!(f.response_headers[0].as_str(), "x-auth-request-user");
        assert_eq!(f.timeout, std::time::Duration::from_secs(5));
        let f = parse(&format!("{head}url = \"http://auth\""))
            .unwrap()
            .http
            .forward_auth
            .unwrap();
        assert_eq!((f.address.as_str(), f.path_and_query.as_str()), ("auth:80", "/"));
        for (bad, path) in [
            ("url = \"https://auth/\"", "http.forward_auth.url"),
            ("url = \"/auth\"", "http.forward_auth.url"),
            (
                "url = \"http://a/\"\nresponse_headers = [\"bad header\"]",
                "http.forward_auth.response_headers[0]",
            ),
            (
                "url = \"http://a/\"\ntimeout = \"soon\"",
                "http.forward_auth.timeout",
            ),
        ] {
            let err = parse(&format!("{head}{bad}")).unwrap_err();
            assert_eq!(err[0].path, path, "{bad}");
        }
    }

    #[test]
    fn access_bounds_take_the_owners_rate_grammar_and_networks() {
        let head = "domain = \"a.b\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n[http.access]\n";
        let a = parse(&format!("{head}max_rate = \"600/m\"\nallow = [\"10.1.2.3/8\"]"))
            .unwrap()
            .http
            .access;
        assert_eq!(a.max_rate.map(|r| r.to_string()).as_deref(), Some("600/m"));
        assert_eq!(a.allow[0].to_string(), "10.0.0.0/8", "networks are truncated");
        assert!(!a.require_protection);
        for (bad, path) in [
            ("max_rate = \"lots\"", "http.access.max_rate"),
            ("max_rate = \"0/s\"", "http.access.max_rate"),
            ("allow = [\"ten\"]", "http.access.allow[0]"),
        ] {
            assert_eq!(parse(&format!("{head}{bad}")).unwrap_err()[0].path, path, "{bad}");
        }
    }

    #[test]
    fn on_demand_orders_leave_a_share_for_the_configured_domains() {
        let head = "domain = \"a.b\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n[acme]\non_demand = true\n";
        let limits = |extra: &str| parse(&format!("{head}{extra}")).map(|c| c.acme.unwrap().limits);
        let l = limits("domains = [\"a.b\"]").unwrap();
        assert_eq!((l.orders_per_week, l.on_demand_orders_per_week), (45, 30));
        let l = limits("").unwrap();
        assert_eq!(
            l.on_demand_orders_per_week, 45,
            "no configured domain: no reserve"
        );
        let l = limits("domains = [\"a.b\"]\norders_per_week = 9").unwrap();
        assert_eq!(l.on_demand_orders_per_week, 6);
        let err = limits("domains = [\"a.b\"]\non_demand_orders_per_week = 45").unwrap_err();
        assert_eq!(err[0].path, "acme.on_demand_orders_per_week");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration(&format!("{}h", u64::MAX)).is_err());
    }

    #[test]
    fn cidrs_and_bare_addresses() {
        assert_eq!(parse_cidr("10.0.0.0/16").unwrap().prefix_len(), 16);
        assert_eq!(parse_cidr("::1").unwrap().prefix_len(), 128);
        assert!(parse_cidr("10.0.0.0/40").is_err());
    }
}
