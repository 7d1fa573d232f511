//! The observability side of the tests: a minimal HTTP/1.1 client for the admin listener (and
//! Prometheus' API), a parser for the Prometheus text format, `promtool check metrics`, and a real
//! `prometheus` server scraping the gateway. Every wait has a deadline.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::process::{poll_until, Output, Proc};
use super::{Gateway, SETUP};

const INSTALL_HINT: &str = "apt-get install -y prometheus";

/// Panics with the install line unless `promtool` and `prometheus` are on PATH: never skip.
pub fn require_prometheus() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["promtool", "prometheus"] {
        let found = std::env::split_paths(&path).any(|dir| dir.join(tool).is_file());
        assert!(
            found,
            "these tests need `{tool}` on PATH; install it with: {INSTALL_HINT}"
        );
    }
}

/// One HTTP response, body as text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// `METHOD PATH` on `127.0.0.1:port` with `Connection: close` and extra `headers`, bounded.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect :{port}: {e}"));
    tcp.set_read_timeout(Some(SETUP)).expect("read timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    tcp.write_all(format!("{req}\r\n").as_bytes())
        .expect("send request");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path} on :{port}: {e}"));
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {raw:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    let status = status.unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Reply {
        status,
        headers: head.to_owned(),
        body,
    }
}

/// Decodes a chunked body (sizes in hex, each chunk followed by CRLF).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16);
        let size = size.unwrap_or_else(|_| panic!("bad chunk size in {rest:?}"));
        if size == 0 {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    out
}

/// The gateway's admin API, optionally with a bearer token.
pub struct Admin {
    pub port: u16,
    pub token: Option<String>,
}

impl Admin {
    pub fn new(gw: &Gateway, token: Option<&str>) -> Admin {
        Admin {
            port: gw.admin_port(),
            token: token.map(str::to_owned),
        }
    }

    pub fn request(&self, method: &str, path: &str) -> Reply {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        http(self.port, method, path, &headers)
    }

    /// `GET /metrics`, which must answer 200.
    pub fn scrape(&self) -> Scrape {
        let reply = self.request("GET", "/metrics");
        assert_eq!(reply.status, 200, "GET /metrics: {reply:?}");
        Scrape::parse(&reply.body)
    }

    /// `GET /tunnels` as JSON, which must answer 200.
    pub fn tunnels(&self) -> Value {
        let reply = self.request("GET", "/tunnels");
        assert_eq!(reply.status, 200, "GET /tunnels: {reply:?}");
        reply.json()
    }
}

/// One series of a scrape.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page (text format 0.0.4), with the text kept for failure messages.
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparsable metrics line {l:?}")))
            .collect();
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// Sum over the series named `name` carrying every label in `labels`; `None` if there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like `sum`, but a missing series counts as 0 (a counter not touched yet).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }

    /// Asserts that the series (summed) reach `min`; a missing series counts as 0.
    pub fn assert_at_least(&self, name: &str, labels: &[(&str, &str)], min: f64) {
        let v = self.count(name, labels);
        assert!(
            v >= min,
            "{name}{labels:?} = {v}, expected >= {min}\n{}",
            self.text
        );
    }

    /// Asserts that the series exist and (summed) equal `want`.
    pub fn assert_value(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let v = self.sum(name, labels);
        assert_eq!(v, Some(want), "{name}{labels:?}\n{}", self.text);
    }

    /// The series named `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// `name{k="v",...} value [timestamp]`, with `\\`, `\"` and `\n` escapes in label values.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &body[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => value.push(match chars.next()?.1 {
                                'n' => '\n',
                                other => other,
                            }),
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name, labels, value })
}

/// `promtool check metrics` with `text` on its stdin (bounded).
pub fn promtool_check(dir: &Path, text: &str) -> Output {
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "metrics"]);
    let mut proc = Proc::spawn(dir, "promtool", cmd);
    let mut stdin = proc.take_stdin().expect("promtool stdin");
    // An early exit closes the pipe; the exit status then tells the test what went wrong.
    let _ = stdin.write_all(text.as_bytes());
    drop(stdin);
    let status = proc
        .wait_exit(SETUP)
        .unwrap_or_else(|| panic!("promtool did not finish within {SETUP:?}\n{}", proc.describe()));
    Output {
        status,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    }
}

/// A `prometheus` server in its own temp subdirectory, scraping `targets` every second.
pub struct Prometheus {
    pub proc: Proc,
    pub port: u16,
}

impl Prometheus {
    /// Starts prometheus on a free loopback port (retrying when the port was taken meanwhile) and
    /// returns once `/-/ready` answers 200.
    pub fn start(dir: &Path, targets: &[u16], job: &str) -> Prometheus {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let home = dir.join(format!("prometheus-{}", COUNTER.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&home).expect("prometheus dir");
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = home.join("prometheus.yml");
        fs::write(&config_file, config).expect("write prometheus.yml");
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut cmd = Command::new("prometheus");
            cmd.arg(format!("--config.file={}", config_file.display()))
                .arg(format!("--storage.tsdb.path={}", home.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"));
            let mut proc = Proc::spawn(&home, "prometheus", cmd);
            // `Some(false)`: it exited, which is fine only if it lost its port (checked below).
            let up = poll_until(Duration::from_secs(30), || match proc.try_wait() {
                Some(_) => Some(false),
                None => ready(port).then_some(true),
            });
            if up == Some(true) {
                return Prometheus { proc, port };
            }
            let stderr = proc.stderr();
            assert!(
                stderr.contains("address already in use"),
                "prometheus did not become ready on :{port}\n{}",
                proc.describe()
            );
        }
        panic!("prometheus found no free port in 5 attempts");
    }

    /// `GET PATH` on the API; must answer 200 with `"status": "success"`.
    pub fn api(&self, path: &str) -> Value {
        let reply = http(self.port, "GET", path, &[]);
        let json = reply.json();
        assert!(
            reply.status == 200 && json["status"] == "success",
            "prometheus {path}: {reply:?}"
        );
        json
    }

    /// Polls `probe` on the API result of `path` until it yields a value (bounded by `timeout`).
    pub fn poll<T>(
        &self,
        path: &str,
        timeout: Duration,
        mut probe: impl FnMut(&Value) -> Option<T>,
    ) -> Option<T> {
        poll_until(timeout, || probe(&self.api(path)))
    }
}

/// Whether prometheus answers `/-/ready` with 200 (any connection error means "not yet").
fn ready(port: u16) -> bool {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /-/ready HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    tcp.write_all(req.as_bytes()).is_ok() && tcp.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

/// Every metric name `deploy/monitoring/grafana-dashboard.json` queries (a histogram by its base
/// name), sorted.
pub fn dashboard_metrics() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring/grafana-dashboard.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard queries too little: {exprs:?}");
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .map(|n| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|b| b.ends_with("_seconds")));
            base.unwrap_or(&n).to_owned()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The `edgemux_…` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("edgemux_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The dashboard's metrics that only a cluster with ACME exports (`tests/cluster/acme.rs`
/// checks them; `tests/monitoring.rs` the others, on one gateway with traffic).
pub fn cluster_or_acme(name: &str) -> bool {
    ["edgemux_cluster_", "edgemux_peer_", "edgemux_acme_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Fails with the names the dashboard queries, among those `which` selects, that none of
/// `scrapes` export.
pub fn assert_dashboard_metrics_exist(scrapes: &[&Scrape], which: fn(&str) -> bool) {
    let exported: std::collections::BTreeSet<&str> = scrapes
        .iter()
        .flat_map(|s| s.samples.iter().map(|x| x.name.as_str()))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                .unwrap_or(n)
        })
        .collect();
    let wanted: Vec<String> = dashboard_metrics().into_iter().filter(|n| which(n)).collect();
    assert!(!wanted.is_empty(), "no dashboard metric selected");
    let missing: Vec<&String> = wanted.iter().filter(|n| !exported.contains(n.as_str())).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the gateway does not export: {missing:?}"
    );
    println!(
        "dashboard: all {} of the metrics it queries checked here are exported",
        wanted.len()
    );
}
