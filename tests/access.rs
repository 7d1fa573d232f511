//! Access rules chosen on the ssh command line, end to end: the real `ssh -R … gw -- OPTIONS`
//! over `openssl s_client`, `curl` as the visitor (directly, or from 127.0.0.5/.6 through HAProxy
//! sending PROXY v2), a hyper backend that echoes the headers it got.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::config::{Listener, ProxyProtocol};
use common::haproxy::{Haproxy, SendProxy};
use common::http::{auth_service, http_backend, Visitor};
use common::process::{poll_until, run_bounded, Proc};
use common::prom::{promtool_check, Admin};
use common::ssh::{KeyKind, SshClient, SshKey, Transport};
use common::{Gateway, TestEnv, SETUP};
use serde_json::Value;

struct Site {
    gw: Gateway,
    client: SshClient,
    key: SshKey,
    visitor: Visitor,
    backend: u16,
    env: TestEnv,
}

fn site() -> Site {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let key = env.key("owner", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let visitor = Visitor::new(&env, &gw);
    Site {
        gw,
        client,
        key,
        visitor,
        backend: http_backend("alpha"),
        env,
    }
}

impl Site {
    /// `ssh -R NAME:80:backend … gw -- OPTIONS`, returned once `tunnels` lists every name.
    fn tunnel_with(&self, names: &[&str], options: &[&str]) -> Proc {
        let specs: Vec<String> = names
            .iter()
            .map(|n| format!("{n}:80:127.0.0.1:{}", self.backend))
            .collect();
        let mut args = Vec::new();
        for spec in &specs {
            args.extend(["-R", spec.as_str()]);
        }
        let mut remote = vec!["--"];
        remote.extend_from_slice(options);
        let holder = self.client.spawn("ssh-R-options", &args, &remote);
        for name in names {
            self.client.wait_tunnel(name, &holder);
        }
        holder
    }
}

fn headers_seen(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("backend headers not JSON ({e})"))
}

fn basic(user: &str, password: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("base64")
        .args(["-w", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("base64 (coreutils)");
    write!(child.stdin.take().unwrap(), "{user}:{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    format!("Authorization: Basic {}", String::from_utf8(out.stdout).unwrap())
}

#[test]
fn auth_asks_for_credentials_and_keeps_them_from_the_backend() {
    let s = site();
    let _holder = s.tunnel_with(&["app"], &["auth=alice:s3cret"]);
    let host = s.key.host("app");

    let none = s.visitor.get(&host, "/headers", &[]);
    none.expect_status(401, "no credentials");
    let realm = none.header("www-authenticate").unwrap_or_default();
    assert!(
        realm.starts_with("Basic realm=") && realm.contains(&host),
        "{realm:?}"
    );

    let wrong = s
        .visitor
        .get(&host, "/headers", &["-H", &basic("alice", "guess")]);
    wrong.expect_status(401, "wrong password");
    let wrong_user = s.visitor.get(&host, "/headers", &["-H", &basic("bob", "s3cret")]);
    wrong_user.expect_status(401, "wrong user");

    for flag in ["--http1.1", "--http2"] {
        let right = s.visitor.get(&host, "/headers", &[flag, "-u", "alice:s3cret"]);
        right.expect_status(200, flag);
        let seen = headers_seen(&right.body);
        assert!(
            seen.get("authorization").is_none(),
            "{flag}: the backend saw {seen}"
        );
    }

    let listed = s.client.find_tunnel("app").unwrap().to_string();
    assert!(listed.contains("alice") && !listed.contains("s3cret"), "{listed}");
    s.gw.wait_log(&["request refused by the tunnel's access rules", "reason=\"auth\""]);
    let scrape = Admin::new(&s.gw, None).scrape();
    assert!(
        scrape
            .text
            .contains("edgemux_access_refusals_total{reason=\"auth\"} 3"),
        "{}",
        scrape.text
    );
    let checked = promtool_check(s.env.path(), &scrape.text);
    assert!(checked.status.success(), "promtool: {}", checked.combined());
}

#[test]
fn private_tunnels_open_with_a_link_a_cookie_for_that_host_or_a_bearer() {
    let s = site();
    let _holder = s.tunnel_with(&["app", "other"], &["private"]);
    let (host, other) = (s.key.host("app"), s.key.host("other"));

    s.visitor.get(&host, "/id", &[]).expect_status(401, "no token");
    let out = s.client.run(&["link", "app"]);
    assert!(out.status.success(), "link: {}", out.combined());
    let url = out.stdout.trim().to_owned();
    let (_, token) = url.split_once("edgemux_link=").expect("the link carries a token");
    assert!(url.starts_with(&format!("https://{host}")), "{url}");

    let jar = s.visitor.file("jar");
    let jar_arg = jar.display().to_string();
    let link_url = s.visitor.url(&host, &format!("/?a=1&edgemux_link={token}"));
    let redeemed = s.visitor.fetch(&host, &link_url, &["-c", &jar_arg]);
    redeemed.expect_status(303, "the link redirects");
    assert_eq!(redeemed.header("location").as_deref(), Some("/?a=1"));
    let cookie = redeemed.header("set-cookie").unwrap_or_default();
    for attr in ["Secure", "HttpOnly", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(
        !cookie.to_ascii_lowercase().contains("domain="),
        "host-only: {cookie}"
    );

    let app_bearer = "Authorization: Bearer the-apps-own-token";
    let with_cookie = s
        .visitor
        .get(&host, "/headers", &["-b", &jar_arg, "-H", app_bearer]);
    with_cookie.expect_status(200, "the cookie opens the tunnel");
    let seen = headers_seen(&with_cookie.body).to_string();
    assert!(!seen.contains(token), "the backend saw the token: {seen}");
    assert!(
        seen.contains("the-apps-own-token"),
        "the app's own bearer must pass: {seen}"
    );

    let cookie_header = format!("Cookie: edgemux_link={token}");
    s.visitor
        .get(&other, "/id", &["-H", &cookie_header])
        .expect_status(401, "another host's cookie");
    let tampered = format!("Cookie: edgemux_link={token}x");
    s.visitor
        .get(&host, "/id", &["-H", &tampered])
        .expect_status(401, "tampered");
    let forged_expiry = format!("Cookie: edgemux_link=9{token}");
    s.visitor
        .get(&host, "/id", &["-H", &forged_expiry])
        .expect_status(401, "re-dated");

    let bearer = format!("Authorization: Bearer {token}");
    let by_bearer = s.visitor.get(&host, "/headers", &["-H", &bearer]);
    by_bearer.expect_status(200, "bearer");
    assert!(headers_seen(&by_bearer.body).get("authorization").is_none());
}

#[test]
fn allow_lists_take_the_client_address_from_proxy_v2() {
    let env = TestEnv::new();
    let gw = env
        .gateway()
        .listeners(&[
            Listener::local().proxy_protocol(ProxyProtocol::Off, &[]),
            Listener::local().proxy_protocol(ProxyProtocol::Required, &["127.0.0.1"]),
        ])
        .start();
    let key = env.key("owner", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let backend = http_backend("alpha");
    let spec = format!("app:80:127.0.0.1:{backend}");
    let holder = client.spawn("ssh-R-allow", &["-R", &spec], &["--", "allow=127.0.0.5/32"]);
    client.wait_tunnel("app", &holder);
    let haproxy = Haproxy::start(env.path(), gw.ports()[1], SendProxy::V2);
    let host = key.host("app");
    let through = |source: &str| Visitor::at(&env, haproxy.port).with_source(source);
    through("127.0.0.5")
        .get(&host, "/id", &[])
        .expect_status(200, "allowed address");
    let refused = through("127.0.0.6").get(&host, "/id", &[]);
    refused.expect_status(403, "address not allowed");
    gw.wait_log(&["request refused", "client=127.0.0.6", "reason=\"allow\""]);
}

#[test]
fn rate_limits_one_tunnel_and_recovers_after_a_second() {
    let s = site();
    let _limited = s.tunnel_with(&["app"], &["rate=5/s"]);
    let free_key = s.env.key("free", KeyKind::Ed25519);
    let free_client = s.gw.ssh(&free_key, Transport::Tls);
    let _free = free_client.open_tunnel("free", 80, s.backend);
    let free_host = free_key.host("free");
    let host = s.key.host("app");

    // One curl process, 50 requests over one connection: a burst.
    let url = s.visitor.url(&host, "/id");
    let mut args = vec!["-w", "%{http_code} %header{retry-after}\n"];
    for _ in 0..50 {
        args.extend(["-o", "/dev/null", url.as_str()]);
    }
    let out = run_bounded(
        s.env.path(),
        "curl-burst",
        s.visitor.curl(&host, SETUP, &args),
        SETUP,
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 50, "{}", out.combined());
    let ok = lines.iter().filter(|l| l.starts_with("200 ")).count();
    let limited: Vec<&&str> = lines.iter().filter(|l| l.starts_with("429 ")).collect();
    assert!((5..=10).contains(&ok) && ok + limited.len() == 50, "{lines:?}");
    for l in &limited {
        let retry: u64 = l[4..].trim().parse().unwrap_or(0);
        assert!(retry >= 1, "429 without a Retry-After of at least 1 s: {l:?}");
    }
    s.visitor
        .get(&free_host, "/id", &[])
        .expect_status(200, "another tunnel is unaffected");
    thread::sleep(Duration::from_millis(1200));
    s.visitor
        .get(&host, "/id", &[])
        .expect_status(200, "a second later");
}

/// Runs `ssh -R app:… gw -- LINE` to its end while a visitor polls the tunnel; returns the
/// ssh output and how many polls got a 200.
fn refused_line(s: &Site, line: &[&str]) -> (common::process::Output, usize) {
    let spec = format!("app:80:127.0.0.1:{}", s.backend);
    let host = s.key.host("app");
    let watching = Arc::new(AtomicBool::new(true));
    let served = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (visitor, host, watching, served) = (
            Visitor::new(&s.env, &s.gw),
            host.clone(),
            watching.clone(),
            served.clone(),
        );
        thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                if visitor.get(&host, "/id", &[]).status == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut remote = vec!["--"];
    remote.extend_from_slice(line);
    let out = run_bounded(
        s.env.path(),
        "ssh-bad-options",
        s.client.command(&["-R", &spec], &remote),
        SETUP,
    );
    watching.store(false, Ordering::Relaxed);
    watcher.join().unwrap();
    (out, served.load(Ordering::Relaxed))
}

#[test]
fn malformed_options_are_refused_on_the_terminal_and_nothing_is_served() {
    let s = site();
    for (line, said) in [
        (&["rate=lots"][..], "rate: expected N/s or N/m"),
        // Mistyped options read as a command: refused too, never served with no rules.
        (&["Private"][..], "unknown command or option"),
        (&["allow", "10.0.0.0/8"][..], "unknown command or option"),
    ] {
        let (out, served) = refused_line(&s, line);
        let text = out.combined();
        assert!(!out.status.success(), "{line:?}: ssh should fail: {text}");
        assert!(text.contains(said), "{line:?}: {text}");
        assert!(text.contains("not served"), "{line:?}: {text}");
        assert_eq!(served, 0, "{line:?}: a refused tunnel answered");
    }
    let help = s.client.run(&["help"]);
    assert!(
        help.stdout.contains("auth=USER:PASS") && help.stdout.contains("link NAME"),
        "{}",
        help.combined()
    );
}

#[test]
fn with_ssh_n_the_defaults_apply_after_the_grace() {
    let s = site();
    let _holder = s.client.open_tunnel("app", 80, s.backend);
    let host = s.key.host("app");
    let got = poll_until(SETUP, || {
        let r = s.visitor.get(&host, "/id", &[]);
        (r.status == 200).then_some(r)
    });
    assert!(got.is_some(), "an ssh -N tunnel is served");
    let listed = s.client.find_tunnel("app").unwrap();
    assert_eq!(listed["members"][0]["rules"], serde_json::json!({}), "{listed}");
}

#[test]
fn a_private_tunnel_is_never_served_without_a_token_even_in_its_first_second() {
    let s = site();
    let host = s.key.host("app");
    let watching = Arc::new(AtomicBool::new(true));
    let (served, answered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let racers: Vec<_> = (0..3)
        .map(|_| {
            let (visitor, host, watching) = (Visitor::new(&s.env, &s.gw), host.clone(), watching.clone());
            let (served, answered) = (served.clone(), answered.clone());
            thread::spawn(move || {
                while watching.load(Ordering::Relaxed) {
                    match visitor.get(&host, "/id", &["--max-time", "3"]).status {
                        200 => served.fetch_add(1, Ordering::Relaxed),
                        401 => answered.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            })
        })
        .collect();
    let _holder = s.tunnel_with(&["app"], &["private"]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while answered.load(Ordering::Relaxed) < 5 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    watching.store(false, Ordering::Relaxed);
    for r in racers {
        r.join().unwrap();
    }
    assert_eq!(served.load(Ordering::Relaxed), 0, "served without a token");
    assert!(
        answered.load(Ordering::Relaxed) >= 1,
        "the private tunnel never answered 401"
    );
}

#[test]
fn forward_auth_passes_2xx_with_its_headers_returns_other_answers_and_fails_closed() {
    let env = TestEnv::new();
    let auth = auth_service();
    let gw = env
        .gateway()
        .set(
            "http.forward_auth.url",
            format!("http://127.0.0.1:{auth}/oauth2/auth"),
        )
        .set("http.forward_auth.response_headers", vec!["X-Auth-Request-User"])
        .set("http.forward_auth.timeout", "2s")
        .start();
    let key = env.key("owner", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let _holder = client.open_tunnel("app", 80, http_backend("alpha"));
    let host = key.host("app");
    let visitor = Visitor::new(&env, &gw);

    let spoof = [
        "-H",
        "X-Auth-Request-User: mallory",
        "-H",
        "X-Real-IP: 10.0.0.5",
        "-H",
        "X-Forwarded-Uri: /public/",
    ];
    let login = visitor.get(&host, "/headers?x=1", &spoof);
    login.expect_status(302, "no session: the auth service's redirect");
    let location = login.header("location").unwrap_or_default();
    assert_eq!(
        location,
        format!("https://sso.test/login?rd=https://{host}/headers?x=1")
    );
    assert_eq!(login.text(), "to the login page");

    let passed = visitor.get(
        &host,
        "/headers",
        &["-H", "Cookie: sso=alice", "-H", "X-Auth-Request-User: mallory"],
    );
    passed.expect_status(200, "a session");
    let seen = headers_seen(&passed.body);
    assert_eq!(
        seen["x-auth-request-user"],
        serde_json::json!(["alice"]),
        "{seen}"
    );

    let scrape = Admin::new(&gw, None).scrape();
    assert!(
        scrape
            .text
            .contains("edgemux_access_refusals_total{reason=\"forward_auth\"} 1"),
        "{}",
        scrape.text
    );

    // The auth service down: closed, never open.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw2 = env
        .gateway()
        .set("http.forward_auth.url", format!("http://127.0.0.1:{dead}/auth"))
        .start();
    let client2 = gw2.ssh(&key, Transport::Tls);
    let _holder2 = client2.open_tunnel("app", 80, http_backend("beta"));
    let refused = Visitor::new(&env, &gw2).get(&host, "/id", &["-H", "Cookie: sso=alice"]);
    refused.expect_status(503, "auth service down");
}

#[test]
fn the_operators_policy_bounds_what_owners_choose() {
    let env = TestEnv::new();
    let gw = env
        .gateway()
        .set("http.access.require_protection", true)
        .set("http.access.max_rate", "10/s")
        .set("http.access.allow", vec!["127.0.0.0/8"])
        .start();
    let key = env.key("owner", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let backend = http_backend("alpha");
    let visitor = Visitor::new(&env, &gw);
    let spec = |name: &str| format!("{name}:80:127.0.0.1:{backend}");

    let looser = run_bounded(
        env.path(),
        "ssh-looser",
        client.command(&["-R", &spec("fast")], &["--", "private", "rate=20/s"]),
        SETUP,
    );
    assert!(!looser.status.success(), "{}", looser.combined());
    assert!(
        looser
            .stderr
            .contains("rate=20/s is above this gateway's highest, 10/s"),
        "{}",
        looser.combined()
    );
    let outside = client.command(&["-R", &spec("wide")], &["--", "private", "allow=192.0.2.0/24"]);
    let outside = run_bounded(env.path(), "ssh-outside", outside, SETUP);
    assert!(
        outside.stderr.contains("allow=192.0.2.0/24 is outside"),
        "{}",
        outside.combined()
    );

    // No options at all: refused by the policy, so never served.
    let bare = client.open_tunnel("bare", 80, backend);
    let bare_host = key.host("bare");
    thread::sleep(Duration::from_millis(1500));
    visitor
        .get(&bare_host, "/id", &[])
        .expect_status(503, "a tunnel without protection");
    drop(bare);

    let holder = client.spawn("ssh-R-ok", &["-R", &spec("ok")], &["--", "auth=alice:s3cret"]);
    client.wait_tunnel("ok", &holder);
    // Listed as soon as the forward is; its rules follow with the session's options.
    let listed = poll_until(SETUP, || {
        let t = client.find_tunnel("ok")?;
        (t["members"][0]["rules"] != "pending").then_some(t)
    })
    .expect("the options are applied");
    let rules = &listed["members"][0]["rules"];
    assert_eq!(rules["rate"], "10/s", "the ceiling is the default: {listed}");
    assert_eq!(rules["allow"], serde_json::json!(["127.0.0.0/8"]), "{listed}");
    let host = key.host("ok");
    visitor
        .get(&host, "/id", &["-u", "alice:s3cret"])
        .expect_status(200, "within the policy");
}

#[test]
fn an_expired_link_is_refused() {
    let s = site();
    let _holder = s.tunnel_with(&["app"], &["private"]);
    let host = s.key.host("app");
    let secret = std::fs::read_to_string(s.env.path().join("certs/links.key")).unwrap();
    let key = edgemux::rules::token::LinkKey::new(secret.trim().as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = key.mint(&host, now + 60);
    let cookie = |t: &str| format!("Cookie: edgemux_link={t}");
    s.visitor
        .get(&host, "/id", &["-H", &cookie(&fresh)])
        .expect_status(200, "a token signed with the gateway's key");
    let expired = s
        .visitor
        .get(&host, "/id", &["-H", &cookie(&key.mint(&host, now - 1))]);
    expired.expect_status(401, "expired");
    assert!(expired.text().contains("expired token"), "{expired:?}");
}

#[test]
fn a_pool_is_as_strict_as_its_strictest_member() {
    let s = site();
    let _open = s.client.open_tunnel("app", 80, s.backend);
    let host = s.key.host("app");
    s.visitor
        .get(&host, "/id", &[])
        .expect_status(200, "one open member");
    let holder = s.client.spawn(
        "ssh-R-private",
        &["-R", &format!("app:80:127.0.0.1:{}", s.backend)],
        &["--", "private"],
    );
    poll_until(SETUP, || {
        let t = s.client.find_tunnel("app")?;
        (t["member_count"] == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("the second member never joined\n{}", holder.describe()));
    for _ in 0..4 {
        s.visitor
            .get(&host, "/id", &[])
            .expect_status(401, "a private member joined the pool");
    }
}
