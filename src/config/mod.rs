//! Configuration: the TOML schema (strict, `deny_unknown_fields`) and its validation into typed values.
//!
//! Parsing never stops at the first problem: [`validate`] collects every problem with its key path so
//! `edgemux check` can print them all at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

mod acme;
mod limits;
pub use acme::{AcmeConfig, ChallengeKind, OrderLimits, RawAcme};
pub use limits::{Limits, LiveLimits, RawLimits};

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
    pub admin: Option<RawAdmin>,
    pub acme: Option<RawAcme>,
}

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsh {
    pub host_key: Option<PathBuf>,
    pub authorized_keys: Option<PathBuf>,
    pub keepalive_interval: Option<String>,
    pub keepalive_max: Option<usize>,
    pub channel_buffer: Option<usize>,
    #[serde(default)]
    pub grant: Vec<RawGrant>,
    #[serde(default)]
    pub reserve: Vec<RawReserve>,
}

/// A vanity host kept for one key: `ssh -R app.example.com:80:…` by that key serves it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReserve {
    pub host: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub owner: String,
    pub keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: String,
    pub token_file: Option<PathBuf>,
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
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

#[derive(Debug, Clone)]
pub struct CertificatePaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Grant {
    pub owner: String,
    pub keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SshConfig {
    pub host_key: PathBuf,
    pub authorized_keys: Option<PathBuf>,
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
    /// Bytes one channel may buffer for a reader that is not keeping up before it is closed.
    pub channel_buffer: usize,
    pub grants: Vec<Grant>,
    /// Vanity host → the key id that alone may serve it.
    pub reserved: std::collections::HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    pub token_file: Option<PathBuf>,
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
    pub admin: Option<AdminConfig>,
    pub acme: Option<AcmeConfig>,
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
        .filter_map(|(i, l)| validate_listener(&mut c, i, l))
        .collect();
    let public_port = raw
        .public_port
        .or_else(|| listeners.first().map(|l| l.bind.port()))
        .unwrap_or(443);
    let ssh = validate_ssh(&mut c, &raw.ssh, raw.tls.certs_dir.as_deref());
    let limits = limits::validate(&mut c, &raw.limits);
    let admin = raw.admin.as_ref().and_then(|a| match a.bind.parse() {
        Ok(bind) => Some(AdminConfig {
            bind,
            token_file: a.token_file.clone(),
        }),
        Err(_) => {
            c.push("admin.bind", format!("{:?} is not an address:port", a.bind));
            None
        }
    });
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
        admin,
        acme,
    })
}

fn certs_dir_or_default(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(defaults::CERTS_DIR))
}

fn validate_listener(c: &mut Collector, i: usize, l: &RawListener) -> Option<ListenerConfig> {
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

fn validate_ssh(c: &mut Collector, raw: &RawSsh, certs_dir: Option<&Path>) -> SshConfig {
    let keepalive_interval = c.duration(
        "ssh.keepalive_interval",
        raw.keepalive_interval.as_deref(),
        defaults::KEEPALIVE_INTERVAL,
    );
    if keepalive_interval.is_zero() {
        c.push("ssh.keepalive_interval", "must be greater than zero");
    }
    let keepalive_max = raw.keepalive_max.unwrap_or(defaults::KEEPALIVE_MAX);
    if keepalive_max == 0 {
        c.push("ssh.keepalive_max", "must be at least 1");
    }
    let channel_buffer = raw.channel_buffer.unwrap_or(defaults::CHANNEL_BUFFER);
    let max_buffer = 2 * defaults::SSH_WINDOW as usize;
    if !(64 * 1024..=max_buffer).contains(&channel_buffer) {
        c.push(
            "ssh.channel_buffer",
            format!("must be between 65536 and {max_buffer} bytes"),
        );
    }
    let mut grants = Vec::new();
    for (i, g) in raw.grant.iter().enumerate() {
        let ids = std::iter::once(("owner".to_string(), &g.owner))
            .chain(g.keys.iter().enumerate().map(|(j, k)| (format!("keys[{j}]"), k)));
        let mut ok = true;
        for (key, id) in ids {
            if !crate::names::is_key_id(id) {
                c.push(
                    format!("ssh.grant[{i}].{key}"),
                    format!("{id:?} is not a key id (see `edgemux keyid KEY.pub`)"),
                );
                ok = false;
            }
        }
        if ok {
            grants.push(Grant {
                owner: g.owner.clone(),
                keys: g.keys.clone(),
            });
        }
    }
    let mut reserved = std::collections::HashMap::new();
    for (i, r) in raw.reserve.iter().enumerate() {
        let host = r.host.trim_end_matches('.').to_ascii_lowercase();
        if !crate::names::is_domain(&host) || !host.contains('.') {
            c.push(
                format!("ssh.reserve[{i}].host"),
                format!("{:?} is not a host name like app.example.com", r.host),
            );
        }
        if !crate::names::is_key_id(&r.key) {
            c.push(
                format!("ssh.reserve[{i}].key"),
                format!("{:?} is not a key id (see `edgemux keyid KEY.pub`)", r.key),
            );
        }
        if reserved.insert(host, r.key.clone()).is_some() {
            c.push(format!("ssh.reserve[{i}].host"), "reserved twice");
        }
    }
    SshConfig {
        reserved,
        host_key: raw
            .host_key
            .clone()
            .unwrap_or_else(|| certs_dir_or_default(certs_dir).join("ssh_host_ed25519_key")),
        authorized_keys: raw.authorized_keys.clone(),
        keepalive_interval,
        keepalive_max,
        channel_buffer,
        grants,
    }
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
