//! The operator's bounds on what owners choose: protection required on every tunnel, a highest
//! rate, networks every tunnel is limited to. Owners may tighten within them, never loosen: a
//! line that would is refused whole with the reason, like a malformed one.

use crate::config::AccessConfig;

use super::{Options, Upstream};

#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `[http.access]`.
    pub access: AccessConfig,
    /// The operator's `forward_auth` is configured (it counts as protection).
    pub forward_auth: bool,
}

impl Policy {
    /// `options` within this policy: the operator's defaults filled in, or why they are refused.
    pub fn apply(&self, mut options: Options) -> Result<Options, String> {
        if options.upstream == Some(Upstream::Passthrough) {
            if self.forward_auth {
                return Err(
                    "this gateway asks its auth service about every visitor, which a tls=passthrough \
                     tunnel would bypass"
                        .into(),
                );
            }
            if self.access.require_protection {
                return Err(
                    "this gateway requires auth=USER:PASS or private on every tunnel, which a \
                     tls=passthrough tunnel cannot have"
                        .into(),
                );
            }
        }
        if self.access.require_protection && !self.forward_auth && options.auth.is_none() && !options.private
        {
            return Err("this gateway requires auth=USER:PASS or private on every tunnel".into());
        }
        match (self.access.max_rate, options.rate) {
            (Some(max), Some(rate)) if rate.per_second() > max.per_second() => {
                return Err(format!("rate={rate} is above this gateway's highest, {max}"));
            }
            (Some(max), None) => options.rate = Some(max),
            _ => {}
        }
        if !self.access.allow.is_empty() {
            match &options.allow {
                None => options.allow = Some(self.access.allow.clone()),
                Some(nets) => {
                    if let Some(outside) = nets
                        .iter()
                        .find(|n| !self.access.allow.iter().any(|a| a.contains(*n)))
                    {
                        let allowed: Vec<String> =
                            self.access.allow.iter().map(ToString::to_string).collect();
                        return Err(format!(
                            "allow={outside} is outside the networks this gateway allows ({})",
                            allowed.join(",")
                        ));
                    }
                }
            }
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rules::{options::parse, Rate};

    fn policy() -> Policy {
        Policy {
            access: AccessConfig {
                require_protection: true,
                max_rate: Rate::parse("100/s"),
                allow: vec!["10.0.0.0/8".parse().unwrap()],
            },
            forward_auth: false,
        }
    }

    #[test]
    fn owners_tighten_within_the_policy_and_get_its_defaults() {
        let got = policy()
            .apply(parse(b"private allow=10.1.0.0/16 rate=30/m").unwrap())
            .unwrap();
        assert_eq!(got.rate.unwrap().to_string(), "30/m");
        assert_eq!(got.allow.unwrap()[0].to_string(), "10.1.0.0/16");
        let got = policy().apply(parse(b"auth=a:b").unwrap()).unwrap();
        assert_eq!(
            got.rate.unwrap().to_string(),
            "100/s",
            "the ceiling is the default"
        );
        assert_eq!(got.allow.unwrap()[0].to_string(), "10.0.0.0/8");
        assert!(Policy::default()
            .apply(Options::default())
            .unwrap()
            .rate
            .is_none());
    }

    #[test]
    fn loosening_is_refused_with_the_reason() {
        let refuse = |line: &[u8]| policy().apply(parse(line).unwrap()).unwrap_err();
        assert!(refuse(b"").contains("requires auth=USER:PASS or private"));
        assert!(refuse(b"allow=10.0.0.1").contains("requires"));
        assert!(refuse(b"private rate=101/s").contains("above this gateway's highest, 100/s"));
        assert!(refuse(b"private allow=10.0.0.0/8,192.0.2.0/24").contains("allow=192.0.2.0/24 is outside"));
        let with_sso = Policy {
            forward_auth: true,
            ..policy()
        };
        assert!(
            with_sso.apply(Options::default()).is_ok(),
            "forward_auth protects every tunnel"
        );
        assert!(with_sso
            .apply(parse(b"tls=passthrough").unwrap())
            .unwrap_err()
            .contains("would bypass"));
        assert!(refuse(b"tls=passthrough").contains("cannot have"));
        let open = Policy {
            access: AccessConfig {
                require_protection: false,
                ..policy().access
            },
            forward_auth: false,
        };
        let got = open.apply(parse(b"tls=passthrough").unwrap()).unwrap();
        assert_eq!(got.rate.unwrap().to_string(), "100/s", "per TLS connection");
    }
}
