//! Observability end to end: `/metrics` after real traffic of every route passes `promtool`,
//! counters move by exactly the traffic sent, a real `prometheus` scrapes the admin listener,
//! `/tunnels` and `DELETE /tunnels/{host}` act on live `ssh -R` tunnels, the bearer token guards
//! the admin API, and `--log-format json` makes every log line JSON.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use common::backend::read_to_eof;
use common::http::{http_backend, Visitor};
use common::process::{poll_until, Proc};
use common::prom::{promtool_check, require_prometheus, Admin, Prometheus, Scrape};
use common::ssh::{KeyKind, SshKey, Transport};
use common::{Gateway, TestEnv, DOMAIN, SETUP};

const REQUESTS: &str = "edgemux_http_requests_total";
const DURATIONS: &str = "edgemux_http_request_duration_seconds_count";
const ROUTED: &str = "edgemux_connections_routed_total";
const REJECTIONS: &str = "edgemux_rejections_total";
const BYTES: &str = "edgemux_bytes_total";
const GET_2XX: [(&str, &str); 3] = [
    ("method", "GET"),
    ("status_class", "2xx"),
    ("protocol", "http/1.1"),
];
const GET_4XX: [(&str, &str); 3] = [
    ("method", "GET"),
    ("status_class", "4xx"),
    ("protocol", "http/1.1"),
];
const HTTP1: [(&str, &str); 1] = [("protocol", "http/1.1")];

/// The harness config plus `[admin] token_file` when `token` is set, started with `global_args`.
fn start(env: &TestEnv, token: Option<&str>, global_args: &[&str]) -> Gateway {
    let mut config = env.gateway();
    if let Some(token) = token {
        let file = env.path().join("admin-token");
        fs::write(&file, format!("{token}\n")).unwrap();
        config = config.admin_token_file(&file);
    }
    config.start_with(global_args)
}

/// A live HTTP tunnel `web` under a fresh key, held by `ssh -R` over TLS.
struct Web {
    key: SshKey,
    host: String,
    holder: Proc,
}

fn open_web(env: &TestEnv, gw: &Gateway) -> Web {
    let key = env.key("a", KeyKind::Ed25519);
    let holder = gw
        .ssh(&key, Transport::Tls)
        .open_tunnel("web", 80, http_backend("web"));
    let host = key.host("web");
    Web { key, host, holder }
}

/// `n` HTTP/1.1 GETs of `https://host/` that must all answer `status`.
fn get_n(visitor: &Visitor, host: &str, n: usize, status: u16) {
    for i in 0..n {
        let reply = visitor.get(host, "/", &["--http1.1"]);
        assert_eq!(reply.status, status, "request {i} to {host}: {reply:?}");
    }
}

/// The route-by-route traffic: one HTTPS request, one raw SSH session, one garbage connection
/// (the tunnel's `ssh -R` and `tunnels` polls already went through TLS).
fn traffic_of_every_route(env: &TestEnv, gw: &Gateway, web: &Web) {
    let reply = Visitor::new(env, gw).get(&web.host, "/", &["--http1.1"]);
    assert_eq!((reply.status, reply.text()), (200, "web".to_owned()), "{reply:?}");
    let raw = gw.ssh(&web.key, Transport::Raw).run(&["tunnels"]);
    assert!(raw.status.success(), "raw ssh `tunnels`: {}", raw.combined());
    let mut tcp = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    tcp.write_all(b"\x00\x01garbage").unwrap();
    let got = read_to_eof(tcp, SETUP);
    assert!(got.is_empty(), "garbage got an answer: {got:?}");
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Scrapes until `ready` holds (bounded); panics with the last page otherwise.
fn scrape_until(admin: &Admin, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = String::new();
    let found = poll_until(SETUP, || {
        let scrape = admin.scrape();
        if ready(&scrape) {
            return Some(scrape);
        }
        last = scrape.text;
        None
    });
    found.unwrap_or_else(|| panic!("{what} not seen in /metrics within {SETUP:?}; last scrape:\n{last}"))
}

#[test]
fn metrics_after_every_route_pass_promtool_with_sane_values() {
    require_prometheus();
    let env = TestEnv::new();
    let gw = start(&env, None, &[]);
    let web = open_web(&env, &gw);
    traffic_of_every_route(&env, &gw, &web);

    // Byte counts are flushed when connections end and the rejection is counted asynchronously.
    let s = scrape_until(&Admin::new(&gw, None), "sniff rejection and byte counts", |s| {
        let moved = |route, dir| s.count(BYTES, &[("route", route), ("direction", dir)]) > 0.0;
        s.count(REJECTIONS, &[("stage", "sniff")]) >= 1.0
            && [("http", "in"), ("http", "out"), ("ssh", "in"), ("ssh", "out")]
                .iter()
                .all(|(route, dir)| moved(*route, *dir))
    });
    let check = promtool_check(env.path(), &s.text);
    let failed = format!(
        "promtool check metrics:\n{}\n--- scrape ---\n{}",
        check.combined(),
        s.text
    );
    assert!(check.status.success(), "{failed}");

    s.assert_at_least(ROUTED, &[("route", "http")], 1.0);
    // The `ssh -R` holder, at least one `tunnels` poll over TLS, and the raw session.
    s.assert_at_least(ROUTED, &[("route", "ssh")], 3.0);
    let accepted = s.count("edgemux_connections_accepted_total", &[]);
    let settled = s.count(ROUTED, &[]) + s.count(REJECTIONS, &[]);
    assert!(
        accepted >= settled,
        "accepted {accepted} < routed + rejected {settled}\n{}",
        s.text
    );
    s.assert_at_least("edgemux_tls_handshakes_total", &[("result", "ok")], 2.0);
    s.assert_at_least(
        "edgemux_tls_handshakes_total",
        &[("result", "ok"), ("alpn", "http/1.1")],
        1.0,
    );
    s.assert_at_least("edgemux_tls_handshake_duration_seconds_count", &[], 2.0);
    s.assert_at_least("edgemux_ssh_auth_attempts_total", &[("result", "ok")], 3.0);
    s.assert_at_least(REQUESTS, &GET_2XX, 1.0);
    s.assert_at_least(DURATIONS, &HTTP1, 1.0);
    s.assert_at_least("edgemux_forwarded_channels_total", &[("result", "opened")], 1.0);
    s.assert_value("edgemux_tunnel_registrations_total", &[("kind", "http")], 1.0);
    s.assert_value("edgemux_tunnels_active", &[("kind", "http")], 1.0);
    s.assert_value("edgemux_tunnel_members_active", &[("kind", "http")], 1.0);
    s.assert_at_least("edgemux_connections_active", &[("route", "ssh")], 1.0);
    s.assert_value(
        "edgemux_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    let expiries = s.series("edgemux_certificate_expiry_timestamp_seconds");
    assert_eq!(
        expiries.len(),
        2,
        "one expiry per configured certificate\n{}",
        s.text
    );
    for e in expiries {
        assert!(
            e.value > unix_now() as f64,
            "certificate {:?} expiry {}",
            e.labels,
            e.value
        );
    }
}

#[test]
fn request_counters_move_by_exactly_the_requests_sent() {
    const N: usize = 7;
    let env = TestEnv::new();
    let gw = start(&env, None, &[]);
    let admin = Admin::new(&gw, None);
    let web = open_web(&env, &gw);
    let visitor = Visitor::new(&env, &gw);
    let unknown = format!("web-zzzzzzzz.{DOMAIN}");
    assert_ne!(unknown, web.host);

    let before = admin.scrape();
    get_n(&visitor, &web.host, N, 200);
    let middle = admin.scrape();
    get_n(&visitor, &unknown, N, 404);
    let after = admin.scrape();

    let delta = |a: &Scrape, b: &Scrape, name: &str, labels: &[(&str, &str)]| {
        let moved = b.count(name, labels) - a.count(name, labels);
        (moved, format!("{name}{labels:?} moved by {moved}\n{}", b.text))
    };
    for (from, to, labels, want) in [
        (&before, &middle, GET_2XX, N),
        (&before, &middle, GET_4XX, 0),
        (&middle, &after, GET_4XX, N),
        (&middle, &after, GET_2XX, 0),
    ] {
        let (moved, why) = delta(from, to, REQUESTS, &labels);
        assert_eq!(moved, want as f64, "{why}");
    }
    let (moved, why) = delta(&before, &after, DURATIONS, &HTTP1);
    assert_eq!(moved, (2 * N) as f64, "{why}");
}

#[test]
fn prometheus_scrapes_the_admin_listener() {
    require_prometheus();
    let env = TestEnv::new();
    let gw = start(&env, None, &[]);
    let prom = Prometheus::start(env.path(), &[gw.admin_port()], "edgemux");
    let deadline = Duration::from_secs(30);

    let mut last = Value::Null;
    let up = prom.poll("/api/v1/targets", deadline, |v| {
        last = v.clone();
        let targets = v["data"]["activeTargets"].as_array()?;
        let up = |t: &&Value| t["labels"]["job"] == "edgemux" && t["health"] == "up";
        targets.iter().find(up).cloned()
    });
    let up = up.unwrap_or_else(|| {
        panic!(
            "target not up within {deadline:?}: {last}\n{}",
            prom.proc.describe()
        )
    });
    let url = format!("http://127.0.0.1:{}/metrics", gw.admin_port());
    assert_eq!(up["scrapeUrl"], url, "{up}");
    assert_eq!(up["lastError"], "", "{up}");

    let query = "/api/v1/query?query=edgemux_build_info";
    let found = prom.poll(query, deadline, |v| {
        v["data"]["result"].as_array()?.first().cloned()
    });
    let series =
        found.unwrap_or_else(|| panic!("no edgemux_build_info in prometheus\n{}", prom.proc.describe()));
    assert_eq!(series["value"][1], "1", "{series}");
    assert_eq!(series["metric"]["version"], env!("CARGO_PKG_VERSION"), "{series}");
    assert_eq!(series["metric"]["job"], "edgemux", "{series}");
}

#[test]
fn tunnels_lists_a_live_tunnel_and_delete_disconnects_it() {
    const N: usize = 3;
    let env = TestEnv::new();
    let gw = start(&env, None, &[]);
    let admin = Admin::new(&gw, None);
    let mut web = open_web(&env, &gw);
    let visitor = Visitor::new(&env, &gw);
    get_n(&visitor, &web.host, N, 200);

    let list = admin.tunnels();
    let tunnels = list["tunnels"]
        .as_array()
        .unwrap_or_else(|| panic!("no tunnels array: {list}"));
    assert_eq!(tunnels.len(), 1, "{list}");
    let t = &tunnels[0];
    let (host, keyid) = (&t["host"], &t["keyid"]);
    assert!(
        *host == web.host && *keyid == web.key.keyid && t["kind"] == "http" && t["port"] == 80,
        "{t}"
    );
    let members = t["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members: {t}"));
    assert_eq!(members.len(), 1, "{t}");
    let m = &members[0];
    let client: Option<SocketAddr> = m["client"].as_str().and_then(|c| c.parse().ok());
    assert!(
        client.is_some_and(|c| c.ip().is_loopback() && c.port() != 0),
        "client: {m}"
    );
    assert_eq!(m["requests"], N, "requests through the tunnel: {m}");
    let positive = |field: &str| m[field].as_u64().is_some_and(|b| b > 0);
    assert!(positive("bytes_in") && positive("bytes_out"), "{m}");
    let since = m["connected_since"].as_u64().unwrap_or(0);
    assert!(
        since <= unix_now() && since + 120 > unix_now(),
        "connected_since: {m}"
    );
    assert!(m["connected_secs"].as_u64().is_some_and(|s| s < 120), "{m}");

    let reply = admin.request("DELETE", &format!("/tunnels/{}", web.host));
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json(), json!({"host": web.host, "disconnected": 1}));
    let empty = || admin.tunnels()["tunnels"].as_array().is_some_and(Vec::is_empty);
    let gone = poll_until(SETUP, || empty().then_some(()));
    assert!(
        gone.is_some(),
        "tunnel still listed after DELETE: {}",
        admin.tunnels()
    );
    let exit = web.holder.wait_exit(SETUP);
    assert!(
        exit.is_some(),
        "ssh -R still running after DELETE\n{}",
        web.holder.describe()
    );
    let told = web.holder.stderr().contains("removed by the operator");
    assert!(
        told,
        "ssh did not report the operator's disconnect\n{}",
        web.holder.describe()
    );

    get_n(&visitor, &web.host, 1, 404);
    let again = admin.request("DELETE", &format!("/tunnels/{}", web.host));
    assert_eq!(again.status, 404, "DELETE of a removed tunnel: {again:?}");
    let s = admin.scrape();
    s.assert_value("edgemux_tunnels_active", &[("kind", "http")], 0.0);
    s.assert_value("edgemux_tunnel_members_active", &[("kind", "http")], 0.0);
    s.assert_value("edgemux_tunnel_removals_total", &[("kind", "http")], 1.0);
}

#[test]
fn bearer_token_guards_everything_but_the_probes() {
    const TOKEN: &str = "t0ken-for-the-observability-tests";
    let env = TestEnv::new();
    let gw = start(&env, Some(TOKEN), &[]);
    let mut web = open_web(&env, &gw);
    let (anonymous, right) = (Admin::new(&gw, None), Admin::new(&gw, Some(TOKEN)));
    let wrong_tokens = ["", "wrong", &TOKEN[..TOKEN.len() - 1], &format!("{TOKEN}x")];

    for path in ["/metrics", "/tunnels"] {
        let reply = anonymous.request("GET", path);
        assert_eq!(reply.status, 401, "GET {path} without a token: {reply:?}");
        let challenge = reply
            .headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer");
        assert!(challenge, "GET {path}: 401 without a Bearer challenge: {reply:?}");
        for wrong in wrong_tokens {
            let reply = Admin::new(&gw, Some(wrong)).request("GET", path);
            assert_eq!(reply.status, 401, "GET {path} with token {wrong:?}: {reply:?}");
        }
        let reply = right.request("GET", path);
        assert_eq!(reply.status, 200, "GET {path} with the right token: {reply:?}");
    }
    right.scrape().assert_value("edgemux_build_info", &[], 1.0);
    for probe in ["/healthz", "/readyz"] {
        let reply = anonymous.request("GET", probe);
        assert_eq!(reply.status, 200, "GET {probe} without a token: {reply:?}");
    }

    let path = format!("/tunnels/{}", web.host);
    for token in [None, Some("wrong")] {
        let reply = Admin::new(&gw, token).request("DELETE", &path);
        assert_eq!(reply.status, 401, "DELETE with token {token:?}: {reply:?}");
    }
    let list = right.tunnels();
    let hosts: Vec<&Value> = list["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["host"])
        .collect();
    assert_eq!(
        hosts,
        [&json!(web.host)],
        "the tunnel must survive unauthorized DELETEs"
    );
    assert!(
        web.holder.try_wait().is_none(),
        "ssh -R exited\n{}",
        web.holder.describe()
    );
}

/// `curl -X METHOD` on the admin listener with the bearer `token` and, when given, `Host: host`;
/// returns the status and the body.
fn admin_curl(
    env: &TestEnv,
    gw: &Gateway,
    (method, path): (&str, &str),
    host: Option<&str>,
    token: &str,
) -> (u16, String) {
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}"])
        .args(["-H", &format!("Authorization: Bearer {token}")]);
    if let Some(host) = host {
        curl.args(["-H", &format!("Host: {host}")]);
    }
    curl.arg(format!("http://127.0.0.1:{}{path}", gw.admin_port()));
    let out = common::process::run_bounded(env.path(), "curl-admin", curl, SETUP);
    let (body, status) = out.stdout.rsplit_once('\n').unwrap_or_default();
    let status = status
        .parse()
        .unwrap_or_else(|_| panic!("curl {method} {path}:\n{}", out.combined()));
    (status, body.to_owned())
}

#[test]
fn admin_api_answers_only_requests_that_name_it_but_probes_answer_any_host() {
    const TOKEN: &str = "t0ken-for-the-rebinding-test";
    const REBIND: &str = "rebind.attacker.example:9090";
    let env = TestEnv::new();
    let token_file = env.path().join("admin-token");
    fs::write(&token_file, TOKEN).unwrap();
    let gw = env
        .gateway()
        .admin_token_file(&token_file)
        .set("admin.hosts", vec!["admin.internal"])
        .start();
    let web = open_web(&env, &gw);
    let delete = format!("/tunnels/{}", web.host);

    for request in [
        ("GET", "/tunnels"),
        ("GET", "/metrics"),
        ("DELETE", delete.as_str()),
    ] {
        let (status, body) = admin_curl(&env, &gw, request, Some(REBIND), TOKEN);
        assert_eq!(status, 421, "{request:?} with Host {REBIND}: {body}");
        assert!(
            body.contains("DNS-rebinding"),
            "{request:?}: the refusal says why: {body}"
        );
    }
    for probe in ["/healthz", "/readyz"] {
        let (status, body) = admin_curl(&env, &gw, ("GET", probe), Some(REBIND), "");
        assert_eq!(status, 200, "{probe} with Host {REBIND} and no token: {body}");
    }
    for host in [
        None,
        Some("localhost:9090"),
        Some("[::1]"),
        Some("Admin.Internal:9090"),
    ] {
        let (status, body) = admin_curl(&env, &gw, ("GET", "/tunnels"), host, TOKEN);
        assert_eq!(status, 200, "GET /tunnels with Host {host:?}: {body}");
        assert!(
            body.contains(&web.host),
            "the tunnel survived the refused DELETE: {body}"
        );
    }
}

#[test]
fn serve_refuses_an_admin_listener_off_loopback_without_a_token() {
    let env = TestEnv::new();
    let config = env.gateway().set("admin.bind", "0.0.0.0:0").write_config();
    let mut serve = common::edgemux();
    serve.arg("serve").arg("-c").arg(&config);
    let out = common::process::run_bounded(env.path(), "serve-open-admin", serve, SETUP);
    assert!(!out.status.success(), "serve started:\n{}", out.combined());
    assert!(
        out.stderr.contains("admin.token_file") && out.stderr.contains("0.0.0.0:0"),
        "the error names the key to set:\n{}",
        out.stderr
    );
    assert!(!out.stdout.contains("ready"), "{}", out.stdout);
}

/// A field of a tracing JSON line: under `fields` (the default layout) or at the top level.
fn field<'a>(line: &'a Value, name: &str) -> &'a Value {
    match &line["fields"][name] {
        Value::Null => &line[name],
        v => v,
    }
}

/// Every non-empty stderr line of the gateway, each of which must be a JSON object.
fn json_lines(gw: &Gateway) -> Vec<Value> {
    let text = gw.stderr();
    let parse = |l: &str| serde_json::from_str::<Value>(l).ok().filter(Value::is_object);
    let lines = text.lines().filter(|l| !l.trim().is_empty());
    lines
        .map(|l| parse(l).unwrap_or_else(|| panic!("stderr line is not a JSON object: {l:?}")))
        .collect()
}

#[test]
fn json_logs_are_json_with_access_and_connection_lines() {
    let env = TestEnv::new();
    let gw = start(&env, None, &["--log-format", "json"]);
    let web = open_web(&env, &gw);
    traffic_of_every_route(&env, &gw, &web);
    let unknown = format!("web-zzzzzzzz.{DOMAIN}");
    get_n(&Visitor::new(&env, &gw), &unknown, 1, 404);

    // The Host header curl sent carries the port; the bare host would be as right.
    let port = gw.port();
    let host_is = |v: &Value, host: &str| {
        [host.to_owned(), format!("{host}:{port}")]
            .iter()
            .any(|h| field(v, "host") == h)
    };
    let access = |v: &Value, status: u16, host: &str| {
        field(v, "message") == "request" && field(v, "status") == status && host_is(v, host)
    };
    // The `connection ended` line of the very connection that carried the request.
    let ended = |v: &Value, client: &Value| {
        field(v, "message") == "connection ended" && v["span"]["client"] == *client
    };
    let refused = |v: &Value| field(v, "message") == "connection refused" && field(v, "stage") == "sniff";
    let seen = poll_until(SETUP, || {
        let lines = json_lines(&gw);
        let line = lines.iter().find(|v| access(v, 200, &web.host))?.clone();
        let end = lines.iter().find(|v| ended(v, field(&line, "client")))?.clone();
        let others = lines.iter().any(|v| access(v, 404, &unknown)) && lines.iter().any(refused);
        others.then_some((line, end))
    });
    let (line, end) = seen.unwrap_or_else(|| {
        panic!(
            "missing access lines (200, 404), `connection ended` or the sniff refusal\n{}",
            gw.stderr()
        )
    });
    assert_eq!(
        (field(&line, "method"), field(&line, "path")),
        (&json!("GET"), &json!("/")),
        "{line}"
    );
    assert_eq!(field(&line, "bytes"), 3, "the body `web` is 3 bytes: {line}");
    assert!(field(&line, "ms").is_u64(), "{line}");
    let client: Option<SocketAddr> = field(&line, "client").as_str().and_then(|c| c.parse().ok());
    assert!(client.is_some_and(|c| c.ip().is_loopback()), "{line}");
    assert_eq!(end["span"]["route"], "http", "{end}");
    assert!(field(&end, "bytes_in").as_u64().is_some_and(|b| b > 0), "{end}");
    // Once more after all traffic: still nothing but JSON objects.
    json_lines(&gw);
}
