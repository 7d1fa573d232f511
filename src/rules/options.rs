//! The options a tunnel owner types after the host in the ssh command
//! (`ssh … gw -- auth=alice:s3cret allow=203.0.113.0/24 rate=20/s private`).
//!
//! The grammar is small and strict: whitespace-separated words, each a known option used at
//! most once; anything else refuses the whole line, so nothing is ever half-applied.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Rate;

/// The longest options line read; longer ones are refused before any parsing.
pub const MAX_LINE: usize = 2048;
/// Most networks one `allow=` may list.
pub const MAX_ALLOW: usize = 32;
/// Longest `auth=` user name, and password, in bytes.
pub const MAX_USER: usize = 64;
pub const MAX_PASSWORD: usize = 128;
pub use crate::config::MAX_RATE;

/// What the owner asked for, as typed (the password in clear: [`super::Rules::from_options`]
/// hashes it and drops this).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub auth: Option<(String, String)>,
    pub private: bool,
    pub allow: Option<Vec<IpNet>>,
    pub rate: Option<Rate>,
    /// `upstream=` or `tls=passthrough`; `None`: HTTP/1.1.
    pub upstream: Option<Upstream>,
}

/// How the gateway speaks to a tunnel's app.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// HTTP/1.1 (`upstream=h1`, the default).
    #[default]
    Http1,
    /// Prior-knowledge cleartext HTTP/2 (`upstream=h2c`): gRPC and other h2-only servers.
    H2c,
    /// Not at all: TLS is not terminated here, its bytes go to the app untouched
    /// (`tls=passthrough`).
    Passthrough,
}

impl Upstream {
    /// The metric label and what `tunnels` shows.
    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "h1",
            Self::H2c => "h2c",
            Self::Passthrough => "passthrough",
        }
    }
}

/// Why an options line was refused; the message is shown on the owner's terminal.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("the options are longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the options are not UTF-8")]
    NotUtf8,
    #[error("unknown option {0:?}; the options are auth=USER:PASS, allow=CIDR,..., rate=N/s or N/m, private, upstream=h1|h2c, tls=terminate|passthrough (ssh gw help)")]
    Unknown(String),
    #[error("{0} given twice")]
    Duplicate(&'static str),
    #[error("{option}: {reason}")]
    Malformed { option: &'static str, reason: String },
}

fn malformed(option: &'static str, reason: impl Into<String>) -> OptionsError {
    OptionsError::Malformed {
        option,
        reason: reason.into(),
    }
}

/// Whether `line` is an options line rather than a command: its first word (after an optional
/// `--`) is an option.
pub fn looks_like_options(line: &str) -> bool {
    let mut words = line.split_ascii_whitespace();
    let first = match words.next() {
        Some("--") => words.next(),
        other => other,
    };
    first.is_some_and(|w| w == "private" || w.contains('='))
}

/// Parses an options line. An empty line gives the defaults.
pub fn parse(line: &[u8]) -> Result<Options, OptionsError> {
    if line.len() > MAX_LINE {
        return Err(OptionsError::TooLong);
    }
    let line = std::str::from_utf8(line).map_err(|_| OptionsError::NotUtf8)?;
    let mut words = line.split_ascii_whitespace().peekable();
    if words.peek() == Some(&"--") {
        words.next();
    }
    let mut out = Options::default();
    let (mut upstream, mut passthrough) = (None, None);
    for word in words {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        match (key, value) {
            ("private", None) => {
                if out.private {
                    return Err(OptionsError::Duplicate("private"));
                }
                out.private = true;
            }
            ("auth", Some(v)) => once(&mut out.auth, "auth", parse_auth(v)?)?,
            ("allow", Some(v)) => once(&mut out.allow, "allow", parse_allow(v)?)?,
            ("rate", Some(v)) => once(&mut out.rate, "rate", parse_rate(v)?)?,
            ("upstream", Some(v)) => once(&mut upstream, "upstream", parse_upstream(v)?)?,
            ("tls", Some(v)) => once(&mut passthrough, "tls", parse_tls(v)?)?,
            _ => return Err(OptionsError::Unknown(shorten(word))),
        }
    }
    out.upstream =
        match (upstream, passthrough) {
            (Some(_), Some(true)) => return Err(malformed(
                "tls",
                "tls=passthrough hands the TLS bytes to your server as they are; upstream= does not apply",
            )),
            (_, Some(true)) => Some(Upstream::Passthrough),
            (upstream, _) => upstream,
        };
    if out.upstream == Some(Upstream::Passthrough)
        && (out.auth.is_some() || out.private || out.rate.is_some())
    {
        return Err(malformed(
            "tls",
            "auth=, private and rate= need the HTTP requests, which a tls=passthrough tunnel does not \
             show the gateway (allow= still applies)",
        ));
    }
    Ok(out)
}

fn parse_upstream(v: &str) -> Result<Upstream, OptionsError> {
    match v {
        "h1" => Ok(Upstream::Http1),
        "h2c" => Ok(Upstream::H2c),
        _ => Err(malformed("upstream", "expected upstream=h1 or upstream=h2c")),
    }
}

/// `true`: passthrough.
fn parse_tls(v: &str) -> Result<bool, OptionsError> {
    match v {
        "terminate" => Ok(false),
        "passthrough" => Ok(true),
        _ => Err(malformed("tls", "expected tls=terminate or tls=passthrough")),
    }
}

fn once<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), OptionsError> {
    if slot.is_some() {
        return Err(OptionsError::Duplicate(name));
    }
    *slot = Some(value);
    Ok(())
}

/// An unknown word, cut so that a refusal never echoes a long line back.
fn shorten(word: &str) -> String {
    word.chars().take(32).collect()
}

fn parse_auth(v: &str) -> Result<(String, String), OptionsError> {
    let (user, password) = v
        .split_once(':')
        .ok_or_else(|| malformed("auth", "expected auth=USER:PASS"))?;
    if user.is_empty() || user.len() > MAX_USER {
        return Err(malformed(
            "auth",
            format!("the user must be 1 to {MAX_USER} bytes"),
        ));
    }
    if !user
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
    {
        return Err(malformed(
            "auth",
            "the user may hold only letters, digits and . _ - @",
        ));
    }
    if password.is_empty() || password.len() > MAX_PASSWORD {
        return Err(malformed(
            "auth",
            format!("the password must be 1 to {MAX_PASSWORD} bytes"),
        ));
    }
    if password.chars().any(char::is_control) {
        return Err(malformed("auth", "the password may not hold control characters"));
    }
    Ok((user.to_owned(), password.to_owned()))
}

fn parse_allow(v: &str) -> Result<Vec<IpNet>, OptionsError> {
    let mut nets = Vec::new();
    for item in v.split(',') {
        if nets.len() == MAX_ALLOW {
            return Err(malformed("allow", format!("at most {MAX_ALLOW} networks")));
        }
        let net = match item.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => match item.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(malformed(
                        "allow",
                        format!("{:?} is not an address or CIDR network", shorten(item)),
                    ))
                }
            },
        };
        nets.push(net);
    }
    Ok(nets)
}

fn parse_rate(v: &str) -> Result<Rate, OptionsError> {
    Rate::parse(v)
        .ok_or_else(|| malformed("rate", format!("expected N/s or N/m with N from 1 to {MAX_RATE}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rules::RateUnit;

    #[test]
    fn the_documented_line_parses() {
        let o = parse(b"-- auth=alice:s3cret allow=203.0.113.0/24,2001:db8::/32 rate=20/s private").unwrap();
        assert_eq!(o.auth, Some(("alice".into(), "s3cret".into())));
        assert!(o.private);
        let allow: Vec<String> = o.allow.unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(allow, ["203.0.113.0/24", "2001:db8::/32"]);
        assert_eq!(
            o.rate,
            Some(Rate {
                count: 20,
                unit: RateUnit::Second
            })
        );
    }

    #[test]
    fn empty_gives_defaults_and_a_bare_address_is_one_host() {
        assert_eq!(parse(b"").unwrap(), Options::default());
        assert_eq!(parse(b"  --  ").unwrap(), Options::default());
        let o = parse(b"allow=127.0.0.5,10.1.2.3/8").unwrap();
        let allow: Vec<String> = o.allow.unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(allow, ["127.0.0.5/32", "10.0.0.0/8"]);
        assert_eq!(
            parse(b"rate=30/m").unwrap().rate,
            Some(Rate {
                count: 30,
                unit: RateUnit::Minute
            })
        );
        let o = parse(b"auth=bob:pa:ss").unwrap();
        assert_eq!(
            o.auth,
            Some(("bob".into(), "pa:ss".into())),
            "the password may hold ':'"
        );
    }

    #[test]
    fn malformed_lines_are_refused_whole() {
        let table: &[(&[u8], &str)] = &[
            (b"rate=lots", "rate: expected N/s"),
            (b"rate=0/s", "rate: expected"),
            (b"rate=100001/s", "rate: expected"),
            (b"rate=5/h", "rate: expected"),
            (b"rate=+5/s", "rate: expected"),
            (b"auth=alice", "auth: expected auth=USER:PASS"),
            (b"auth=:x", "auth: the user"),
            (b"auth=al ice:x", "auth: expected"),
            (b"auth=a/b:x", "auth: the user may hold"),
            (b"auth=a:", "auth: the password"),
            (b"allow=nowhere", "allow: \"nowhere\" is not"),
            (b"allow=", "allow:"),
            (b"private private", "private given twice"),
            (b"rate=1/s rate=2/s", "rate given twice"),
            (b"public", "unknown option \"public\""),
            (b"upstream=h3", "upstream: expected upstream=h1 or upstream=h2c"),
            (b"tls=off", "tls: expected tls=terminate"),
            (b"tls=passthrough upstream=h2c", "upstream= does not apply"),
            (b"tls=passthrough private", "need the HTTP requests"),
            (b"auth=a:b tls=passthrough", "need the HTTP requests"),
            (b"rate=1/s tls=passthrough", "need the HTTP requests"),
            (b"upstream=h2c upstream=h1", "upstream given twice"),
            (b"private=yes", "unknown option"),
            (b"\xff", "not UTF-8"),
        ];
        for (line, want) in table {
            let err = parse(line).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{:?}: {err:?} lacks {want:?}",
                String::from_utf8_lossy(line)
            );
        }
        let long = vec![b'x'; MAX_LINE + 1];
        assert_eq!(parse(&long), Err(OptionsError::TooLong));
        let many = format!("allow={}", vec!["10.0.0.1"; MAX_ALLOW + 1].join(","));
        assert!(parse(many.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("at most"));
        let password = "p".repeat(MAX_PASSWORD + 1);
        assert!(parse(format!("auth=a:{password}").as_bytes()).is_err());
    }

    #[test]
    fn upstream_and_tls_choose_how_the_app_is_spoken_to() {
        assert_eq!(parse(b"upstream=h2c").unwrap().upstream, Some(Upstream::H2c));
        assert_eq!(
            parse(b"upstream=h1 tls=terminate").unwrap().upstream,
            Some(Upstream::Http1)
        );
        assert_eq!(parse(b"tls=terminate").unwrap().upstream, None);
        let o = parse(b"-- tls=passthrough allow=10.0.0.0/8").unwrap();
        assert_eq!(o.upstream, Some(Upstream::Passthrough));
        assert!(o.allow.is_some(), "allow= works on passthrough tunnels");
        assert!(looks_like_options("tls=passthrough"));
    }

    #[test]
    fn every_prefix_parses_or_refuses_without_panic() {
        let line = b"-- auth=alice:s3cret allow=203.0.113.0/24,2001:db8::/32 rate=20/s private";
        for n in 0..=line.len() {
            let _ = parse(&line[..n]);
        }
    }

    #[test]
    fn options_are_told_from_commands() {
        assert!(looks_like_options("-- auth=a:b"));
        assert!(looks_like_options("private"));
        assert!(looks_like_options("rate=lots"));
        assert!(!looks_like_options("tunnels"));
        assert!(!looks_like_options("link app"));
        assert!(!looks_like_options(""));
    }
}
