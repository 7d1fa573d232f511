//! What a person sees, in a real browser: headless Chromium (Debian `chromium`) renders the apex
//! page, a live tunnel's page (whose WebSocket connects through the same tunnel), an offline
//! tunnel, a 502 and a 429; `curl` gets the same answers as short text. Screenshots are kept as
//! test artifacts under `target/tmp/pages/`, and their paths printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::http::{http_backend, Visitor};
use common::process::run_bounded;
use common::ssh::{KeyKind, Transport};
use common::{Gateway, TestEnv, DOMAIN};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMIUM_HINT: &str = "these tests need Debian's Chromium: apt-get install -y chromium";
/// One page load, JavaScript included, at most.
const RENDER: Duration = Duration::from_secs(60);

/// A headless Chromium of its own (profile in the test's dir), every `*.gw.test` name sent to
/// 127.0.0.1, the test CA's certificates accepted.
fn chromium(dir: &Path, extra: &[&str], url: &str) -> Command {
    assert!(Path::new(CHROMIUM).is_file(), "{CHROMIUM_HINT}");
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--ignore-certificate-errors",
        &format!("--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1,MAP {DOMAIN} 127.0.0.1"),
        &format!("--user-data-dir={}", dir.join("chromium-profile").display()),
    ])
    .args(extra)
    .arg(url);
    cmd
}

/// Renders `url`: the visible text of the DOM after scripts ran (5 s of JavaScript's virtual
/// time), and a screenshot saved as `target/tmp/pages/NAME.png`.
fn render(env: &TestEnv, name: &str, url: &str) -> (String, PathBuf) {
    let dir = env.path();
    let dump = chromium(dir, &["--virtual-time-budget=5000", "--dump-dom"], url);
    let out = run_bounded(dir, &format!("chromium-{name}"), dump, RENDER);
    assert!(
        out.status.success(),
        "chromium --dump-dom {url}:\n{}",
        out.combined()
    );
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pages");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let take = chromium(
        dir,
        &["--window-size=1024,768", "--virtual-time-budget=5000", &arg],
        url,
    );
    let shown = run_bounded(dir, &format!("chromium-shot-{name}"), take, RENDER);
    assert!(
        shown.status.success() && shot.is_file(),
        "chromium --screenshot {url}:\n{}",
        shown.combined()
    );
    println!("screenshot of {url}: {}", shot.display());
    (visible_text(&out.stdout), shot)
}

/// The visible text of a DOM: tags, styles and scripts dropped, the escaped characters decoded.
fn visible_text(dom: &str) -> String {
    let mut text = String::new();
    let mut rest = dom;
    while let Some(at) = rest.find('<') {
        text.push_str(&rest[..at]);
        text.push(' ');
        let tag = &rest[at..];
        let lower = tag.get(..8).unwrap_or(tag).to_ascii_lowercase();
        let skip_to = if lower.starts_with("<style") {
            tag.find("</style>")
        } else if lower.starts_with("<script") {
            tag.find("</script>")
        } else {
            Some(0)
        };
        let after = skip_to.and_then(|s| tag[s..].find('>').map(|e| s + e + 1));
        rest = after.map_or("", |e| &tag[e..]);
    }
    text.push_str(rest);
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

fn url(gw: &Gateway, host: &str, path: &str) -> String {
    format!("https://{host}:{}{path}", gw.port())
}

#[test]
fn a_browser_sees_pages_a_person_understands() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let key = env.key("dev", KeyKind::Ed25519);
    let client = gw.ssh(&key, Transport::Tls);
    let visitor = Visitor::new(&env, &gw);

    // The apex page: what this is, the ssh config block, the host key to pin.
    let fingerprint = gw
        .wait_log(&["SSH host key fingerprint="])
        .split("fingerprint=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (apex, _) = render(&env, "apex", &url(&gw, DOMAIN, "/"));
    for want in [
        "is an edgemux gateway",
        &format!("Host {DOMAIN}"),
        "ExitOnForwardFailure yes",
        &fingerprint,
    ] {
        assert!(apex.contains(want), "apex page lacks {want:?}:\n{apex}");
    }
    let plain = visitor.get(DOMAIN, "/", &[]);
    assert!(
        plain.text().contains(&fingerprint) && !plain.text().contains('<'),
        "curl gets text: {}",
        plain.text()
    );

    // A live tunnel's page, whose script opens a WebSocket through the same tunnel.
    let _live = client.open_tunnel("live", 80, http_backend("live"));
    let (page, _) = render(&env, "live", &url(&gw, &key.host("live"), "/page"));
    assert!(page.contains("served through the tunnel"), "{page}");
    assert!(
        page.contains("websocket echo: ping from the browser"),
        "the WebSocket did not connect:\n{page}"
    );

    // A tunnel no one serves: its name and the command that would start it.
    let offline = key.host("offline");
    let (page, _) = render(&env, "offline", &url(&gw, &offline, "/"));
    let label = offline.strip_suffix(&format!(".{DOMAIN}")).unwrap();
    for want in [
        "404 Not Found".to_owned(),
        format!("no tunnel {label} is connected"),
        format!("ssh -R offline:80:localhost:3000 {DOMAIN}"),
    ] {
        assert!(page.contains(&want), "offline page lacks {want:?}:\n{page}");
    }
    let plain = visitor.get(&offline, "/", &[]);
    assert_eq!(plain.status, 404);
    assert!(
        plain
            .text()
            .starts_with(&format!("no tunnel {label} is connected")),
        "{}",
        plain.text()
    );

    // A tunnel client whose app is not running: 502.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _dead = client.open_tunnel("dead", 80, dead_port);
    let (page, _) = render(&env, "bad-gateway", &url(&gw, &key.host("dead"), "/"));
    assert!(page.contains("502 Bad Gateway"), "{page}");
    assert!(page.contains("tunnel"), "{page}");

    // Over the tunnel's rate: 429, the page says so and nothing of the request is echoed raw.
    let limited = client.spawn(
        "ssh-R-rate",
        &["-R", &format!("limited:80:127.0.0.1:{}", http_backend("limited"))],
        &["--", "rate=1/m"],
    );
    client.wait_tunnel("limited", &limited);
    limited.wait_output("rate", false, common::SETUP);
    let host = key.host("limited");
    visitor
        .get(&host, "/", &[])
        .expect_status(200, "the first request of the minute");
    let (page, _) = render(&env, "too-many", &url(&gw, &host, "/"));
    assert!(page.contains("429 Too Many Requests"), "{page}");
    assert!(page.contains("too many requests to this tunnel"), "{page}");

    // A tunnel app's own error page reaches a browser as the app sent it.
    let own = visitor.get(&key.host("live"), "/nope", &["-H", "Accept: text/html"]);
    assert_eq!(
        (own.status, own.text().as_str()),
        (404, "no such route"),
        "the app's own 404"
    );
}
