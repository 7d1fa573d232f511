//! `[ssh]`: the SSH endpoint's keys, keepalives, channel buffer, and which keys may reach or
//! serve what. Keys are named by their full `SHA256:` fingerprint, never by the short key id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::Collector;
use crate::names::KeyFingerprint;

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

/// Keys (`SHA256:` fingerprints) that may reach `owner`'s private tunnels.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub owner: String,
    pub keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Grant {
    pub owner: KeyFingerprint,
    pub keys: Vec<KeyFingerprint>,
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
    /// Vanity host → the key that alone may serve it.
    pub reserved: HashMap<String, KeyFingerprint>,
}

pub(super) fn validate(c: &mut Collector, raw: &RawSsh, certs_dir: Option<&Path>) -> SshConfig {
    let keepalive_interval = c.duration(
        "ssh.keepalive_interval",
        raw.keepalive_interval.as_deref(),
        super::defaults::KEEPALIVE_INTERVAL,
    );
    if keepalive_interval.is_zero() {
        c.push("ssh.keepalive_interval", "must be greater than zero");
    }
    let keepalive_max = raw.keepalive_max.unwrap_or(super::defaults::KEEPALIVE_MAX);
    if keepalive_max == 0 {
        c.push("ssh.keepalive_max", "must be at least 1");
    }
    let channel_buffer = raw.channel_buffer.unwrap_or(super::defaults::CHANNEL_BUFFER);
    let max_buffer = 2 * super::defaults::SSH_WINDOW as usize;
    if !(64 * 1024..=max_buffer).contains(&channel_buffer) {
        c.push(
            "ssh.channel_buffer",
            format!("must be between 65536 and {max_buffer} bytes"),
        );
    }
    let mut grants = Vec::new();
    for (i, g) in raw.grant.iter().enumerate() {
        let owner = fingerprint(c, &format!("ssh.grant[{i}].owner"), &g.owner);
        let keys: Vec<Option<KeyFingerprint>> = g
            .keys
            .iter()
            .enumerate()
            .map(|(j, k)| fingerprint(c, &format!("ssh.grant[{i}].keys[{j}]"), k))
            .collect();
        if let (Some(owner), Some(keys)) = (owner, keys.into_iter().collect::<Option<Vec<_>>>()) {
            grants.push(Grant { owner, keys });
        }
    }
    let mut reserved = HashMap::new();
    for (i, r) in raw.reserve.iter().enumerate() {
        let host = r.host.trim_end_matches('.').to_ascii_lowercase();
        if !crate::names::is_domain(&host) || !host.contains('.') {
            c.push(
                format!("ssh.reserve[{i}].host"),
                format!("{:?} is not a host name like app.example.com", r.host),
            );
        }
        let Some(key) = fingerprint(c, &format!("ssh.reserve[{i}].key"), &r.key) else {
            continue;
        };
        if reserved.insert(host, key).is_some() {
            c.push(format!("ssh.reserve[{i}].host"), "reserved twice");
        }
    }
    SshConfig {
        reserved,
        host_key: raw
            .host_key
            .clone()
            .unwrap_or_else(|| super::certs_dir_or_default(certs_dir).join("ssh_host_ed25519_key")),
        authorized_keys: raw.authorized_keys.clone(),
        keepalive_interval,
        keepalive_max,
        channel_buffer,
        grants,
    }
}

/// A key named in the config: its `SHA256:` fingerprint. A short key id is refused: 40 bits
/// do not identify a key.
fn fingerprint(c: &mut Collector, path: &str, text: &str) -> Option<KeyFingerprint> {
    let parsed = KeyFingerprint::parse(text);
    if parsed.is_none() {
        let hint = if crate::names::is_key_id(text) {
            "a key id is too short to identify a key; "
        } else {
            ""
        };
        c.push(
            path,
            format!(
                "{text:?} is not a key fingerprint: {hint}use the SHA256:… that \
                 `edgemux keyid --fingerprint KEY.pub` or `ssh-keygen -lf KEY.pub` prints"
            ),
        );
    }
    parsed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    const HEAD: &str = "domain = \"gw.test\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n";
    const FP: &str = "SHA256:M1EHtmVEQRQ9PRm2LCsyjWSeNzct+SVx/135HLYdUM4";

    #[test]
    fn keys_are_named_by_full_fingerprint_and_short_ids_are_refused() {
        let good = format!(
            "{HEAD}[[ssh.grant]]\nowner = \"{FP}\"\nkeys = [\"{FP}\"]\n\
             [[ssh.reserve]]\nhost = \"app.example.com\"\nkey = \"{FP}\"\n"
        );
        let c = crate::config::parse(&good).unwrap();
        assert_eq!(c.ssh.grants[0].owner.to_string(), FP);
        assert_eq!(c.ssh.reserved["app.example.com"].to_string(), FP);
        let short = format!("{HEAD}[[ssh.grant]]\nowner = \"abcd2345\"\nkeys = [\"{FP}\"]\n");
        let err = crate::config::parse(&short).unwrap_err();
        assert_eq!(err[0].path, "ssh.grant[0].owner");
        assert!(err[0].message.contains("too short"), "{}", err[0].message);
        let bad = format!("{HEAD}[[ssh.reserve]]\nhost = \"a.example.com\"\nkey = \"SHA256:nope\"\n");
        assert_eq!(
            crate::config::parse(&bad).unwrap_err()[0].path,
            "ssh.reserve[0].key"
        );
    }
}
