//! Who may visit a tunnel: the rules its owner chose on the ssh command line (`options`),
//! bounded by the operator's policy, and the per-request decision (`decide`), pure apart from
//! the rate bucket's clock.

pub mod decide;
mod gate;
pub mod options;
mod policy;
mod rate;
pub mod token;

use std::net::IpAddr;

use ipnet::IpNet;

/// The rate grammar is the config's, shared with `http.access.max_rate`.
pub use crate::config::{Rate, RateUnit};
pub use decide::{decide, Decision, Refusal, Visit};
pub use gate::{Gate, GateState, SETTLE_WITHIN};
pub use options::{Options, OptionsError, Upstream};
pub use policy::Policy;
pub use rate::Bucket;

/// HTTP basic auth credentials, the password kept only as a salted SHA-256.
pub struct BasicAuth {
    user: String,
    salt: [u8; 16],
    hash: [u8; 32],
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl BasicAuth {
    pub fn new(user: &str, password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        Self {
            user: user.to_owned(),
            salt,
            hash: salted(&salt, password),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Both compared in constant time (the user too, so a probe learns nothing from timing).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        use aws_lc_rs::constant_time::verify_slices_are_equal;
        let user_ok =
            verify_slices_are_equal(&salted(&self.salt, user), &salted(&self.salt, &self.user)).is_ok();
        let password_ok = verify_slices_are_equal(&salted(&self.salt, password), &self.hash).is_ok();
        user_ok & password_ok
    }
}

fn salted(salt: &[u8; 16], secret: &str) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(salt);
    ctx.update(secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The effective rules of one tunnel: the owner's options within the operator's policy.
#[derive(Debug, Default)]
pub struct Rules {
    pub auth: Option<BasicAuth>,
    pub private: bool,
    /// Empty: every client address.
    pub allow: Vec<IpNet>,
    pub rate: Option<Rate>,
    /// How the gateway speaks to the app; on `Passthrough` only `allow` and the operator's
    /// rate (per TLS connection) apply.
    pub upstream: Upstream,
}

impl Rules {
    /// The rules `options` ask for; the password is hashed here and the clear one dropped.
    pub fn from_options(options: Options) -> Self {
        Self {
            auth: options.auth.map(|(u, p)| BasicAuth::new(&u, &p)),
            private: options.private,
            allow: options.allow.unwrap_or_default(),
            rate: options.rate,
            upstream: options.upstream.unwrap_or_default(),
        }
    }

    /// A peer replica may be handed a channel into this tunnel: it has no rule to check (other
    /// replicas do not know the rules) and its TLS is terminated by the gateway. Peers speak
    /// HTTP/1.1 or h2c to it, as the directory says the owner asked.
    pub fn open_to_peers(&self) -> bool {
        self.is_open() && self.upstream != Upstream::Passthrough
    }

    /// No rule at all: every visitor passes, and nothing of the request need be read.
    pub fn is_open(&self) -> bool {
        self.auth.is_none() && !self.private && self.allow.is_empty() && self.rate.is_none()
    }

    pub fn allows(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&client))
    }

    /// What `/tunnels` and `ssh gw tunnels` show: the rules, never a secret.
    pub fn summary(&self) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        if let Some(auth) = &self.auth {
            v.insert("auth".into(), format!("basic (user {})", auth.user).into());
        }
        if self.private {
            v.insert("private".into(), true.into());
        }
        if !self.allow.is_empty() {
            let nets: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
            v.insert("allow".into(), nets.into());
        }
        if let Some(rate) = self.rate {
            v.insert("rate".into(), rate.to_string().into());
        }
        if self.upstream != Upstream::Http1 {
            v.insert("upstream".into(), self.upstream.label().into());
        }
        serde_json::Value::Object(v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn basic_auth_keeps_a_hash_and_checks_both_parts() {
        let a = BasicAuth::new("alice", "s3cret");
        assert!(a.verify("alice", "s3cret"));
        assert!(!a.verify("alice", "s3cret "));
        assert!(!a.verify("bob", "s3cret"));
        assert!(!a.verify("", ""));
        assert!(!format!("{a:?}").contains("s3cret"));
    }

    #[test]
    fn allow_lists_match_by_network_and_v4_mapped_addresses() {
        let rules = Rules {
            allow: vec!["127.0.0.5/32".parse().unwrap()],
            ..Rules::default()
        };
        assert!(rules.allows("127.0.0.5".parse().unwrap()));
        assert!(rules.allows("::ffff:127.0.0.5".parse().unwrap()));
        assert!(!rules.allows("127.0.0.6".parse().unwrap()));
        assert!(Rules::default().allows("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn the_summary_names_the_rules_but_no_secret() {
        let options = options::parse(b"auth=alice:s3cret rate=5/s private").unwrap();
        let text = Rules::from_options(options).summary().to_string();
        assert!(
            text.contains("alice") && text.contains("5/s") && text.contains("private"),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
    }
}
