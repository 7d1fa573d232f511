//! The gateway config a test starts from, built as a TOML tree with typed setters and rendered
//! with `toml::to_string`. Tests change the config through these setters (and `set` for anything
//! else, deliberately broken values included), never by editing rendered text, so a change in the
//! harness's defaults cannot make an edit silently miss.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use toml::{Table, Value};

use super::pki::Leaf;
use super::ssh::SshKey;
use super::{Gateway, TestEnv, DOMAIN};

/// A listener's `proxy_protocol` mode.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    Off,
    Optional,
    Required,
}

/// One `[[listener]]` table; unset fields are left out, so the gateway's defaults apply.
#[derive(Clone, Debug, Serialize)]
pub struct Listener {
    pub bind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain_ssh: Option<bool>,
}

impl Listener {
    /// A listener on `127.0.0.1:0`: the harness learns its port from the `listening` line.
    pub fn local() -> Listener {
        Listener::bind("127.0.0.1:0")
    }

    /// A listener on `addr` as written, which need not be a valid address (for `edgemux check`).
    pub fn bind(addr: &str) -> Listener {
        Listener {
            bind: addr.to_owned(),
            proxy_protocol: None,
            trusted_proxies: Vec::new(),
            plain_ssh: None,
        }
    }

    /// PROXY headers in `mode`, accepted from the `trusted` networks.
    pub fn proxy_protocol(mut self, mode: ProxyProtocol, trusted: &[&str]) -> Listener {
        self.proxy_protocol = Some(mode);
        self.trusted_proxies = trusted.iter().map(|&t| t.to_owned()).collect();
        self
    }
}

/// A path as a TOML string.
fn path_value(path: &Path) -> Value {
    Value::String(path.display().to_string())
}

/// The harness's gateway config, changed through typed setters before it is written or started.
#[derive(Clone)]
pub struct GatewayBuilder<'a> {
    env: &'a TestEnv,
    config: Table,
}

impl<'a> GatewayBuilder<'a> {
    /// The default test gateway: `gw.test` on one local listener, both test certificates, a host
    /// key under `certs/`, fast keepalives (dead clients are noticed within seconds), a short
    /// sniff timeout, and an admin listener. Open mode: any key may log in.
    pub fn new(env: &'a TestEnv) -> GatewayBuilder<'a> {
        let certs = env.path().join("certs");
        fs::create_dir_all(&certs).expect("create certs dir");
        let empty = GatewayBuilder {
            env,
            config: Table::new(),
        };
        empty
            .set("domain", DOMAIN)
            .listeners(&[Listener::local()])
            .set("tls.certs_dir", path_value(&certs))
            .certificates(&[&env.pki.gw, &env.pki.other])
            .set("ssh.host_key", path_value(&certs.join("ssh_host_ed25519_key")))
            .set("ssh.keepalive_interval", "1s")
            .set("ssh.keepalive_max", 2)
            .limit("sniff_timeout", "500ms")
            .limit("pre_routing_timeout", "10s")
            .set("admin.bind", "127.0.0.1:0")
    }

    /// Sets the value at a dotted `path` (`"limits.header_timeout"`, `"no_such_key"`), creating
    /// the tables on the way; anything the gateway reads, or deliberately does not.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Self {
        let (parent, key) = path.rsplit_once('.').map_or((None, path), |(p, k)| (Some(p), k));
        let mut table = &mut self.config;
        for name in parent.into_iter().flat_map(|p| p.split('.')) {
            let entry = table.entry(name).or_insert_with(|| Value::Table(Table::new()));
            table = entry
                .as_table_mut()
                .unwrap_or_else(|| panic!("config path {path:?}: {name:?} is not a table"));
        }
        table.insert(key.to_owned(), value.into());
        self
    }

    /// Appends `item` to the array of tables at `path` (`"ssh.grant"`), creating it if absent.
    fn push(self, path: &str, item: Value) -> Self {
        let mut items = self
            .get(path)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        items.push(item);
        self.set(path, items)
    }

    /// The value at a dotted `path`, if set.
    fn get(&self, path: &str) -> Option<&Value> {
        let mut names = path.split('.');
        let first = self.config.get(names.next()?)?;
        names.try_fold(first, |value, name| value.get(name))
    }

    /// `[[listener]]`: exactly these, in this order (the order of `Gateway::ports`).
    pub fn listeners(self, listeners: &[Listener]) -> Self {
        let tables: Vec<Value> = listeners
            .iter()
            .map(|l| Value::try_from(l).expect("a listener as TOML"))
            .collect();
        self.set("listener", tables)
    }

    /// `[[tls.certificate]]`: exactly these leaves, the first one the default.
    pub fn certificates(self, leaves: &[&Leaf]) -> Self {
        let tables: Vec<Value> = leaves
            .iter()
            .map(|leaf| {
                let mut table = Table::new();
                table.insert("cert".to_owned(), path_value(&leaf.chain));
                table.insert("key".to_owned(), path_value(&leaf.key));
                Value::Table(table)
            })
            .collect();
        self.set("tls.certificate", tables)
    }

    /// One `[limits]` key, e.g. `.limit("header_timeout", "2s")` or
    /// `.limit("max_connections_per_client", 5)`.
    pub fn limit(self, key: &str, value: impl Into<Value>) -> Self {
        self.set(&format!("limits.{key}"), value)
    }

    /// Only these keys may log in (not called: open mode). Writes `DIR/authorized_keys`.
    pub fn authorized_keys(self, keys: &[&SshKey]) -> Self {
        let file = self.env.path().join("authorized_keys");
        let lines: Vec<String> = keys
            .iter()
            .map(|k| fs::read_to_string(&k.public).expect("read public key"))
            .collect();
        fs::write(&file, lines.concat()).expect("write authorized_keys");
        self.set("ssh.authorized_keys", path_value(&file))
    }

    /// `[[ssh.grant]]`: `keys` may reach `owner`'s private TCP tunnels.
    pub fn grant(self, owner: &SshKey, keys: &[&SshKey]) -> Self {
        let mut grant = Table::new();
        grant.insert("owner".to_owned(), owner.fingerprint.clone().into());
        let ids: Vec<String> = keys.iter().map(|k| k.fingerprint.clone()).collect();
        grant.insert("keys".to_owned(), ids.into());
        self.push("ssh.grant", Value::Table(grant))
    }

    /// `[[ssh.reserve]]`: the vanity `host` is served only for `key`.
    pub fn reserve(self, host: &str, key: &SshKey) -> Self {
        let mut reserve = Table::new();
        reserve.insert("host".to_owned(), host.into());
        reserve.insert("key".to_owned(), key.fingerprint.clone().into());
        self.push("ssh.reserve", Value::Table(reserve))
    }

    /// `[admin] token_file`: the admin API wants the bearer token in `file`.
    pub fn admin_token_file(self, file: &Path) -> Self {
        self.set("admin.token_file", path_value(file))
    }

    /// The config as TOML.
    pub fn render(&self) -> String {
        toml::to_string(&self.config).expect("render the config as TOML")
    }

    /// Writes the config to a fresh file in the temp dir and returns its path.
    pub fn write_config(&self) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.env.path().join(format!("edgemux-{n}.toml"));
        fs::write(&path, self.render()).expect("write config");
        path
    }

    pub fn start(self) -> Gateway {
        self.start_with(&[])
    }

    /// Like `start`, with global CLI flags before `serve` (e.g. `--log-format json`).
    pub fn start_with(self, global_args: &[&str]) -> Gateway {
        Gateway::start_with(self.env, &self.write_config(), global_args)
    }
}
