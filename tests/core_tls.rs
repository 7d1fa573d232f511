//! The TLS front and protocol routing of the one port: versions, SNI certificate choice, a
//! fragmented ClientHello, SSH for silent clients; plus `edgemux check` on configs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use common::config::{GatewayBuilder, Listener};
use common::process::{run_bounded, Output};
use common::{edgemux, Gateway, TestEnv, DOMAIN, SETUP};

/// `openssl s_client -connect 127.0.0.1:PORT ARGS` with stdin closed: it handshakes, then quits.
fn s_client(env: &TestEnv, gw: &Gateway, args: &[&str]) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{}", gw.port())])
        .args(args);
    run_bounded(env.path(), "s_client", cmd, SETUP)
}

#[test]
fn tls_1_0_and_1_1_are_refused() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    for version in ["-tls1", "-tls1_1"] {
        // Debian's OpenSSL will not even offer TLS < 1.2 above security level 0.
        let out = s_client(
            &env,
            &gw,
            &[version, "-cipher", "DEFAULT@SECLEVEL=0", "-servername", DOMAIN],
        );
        let text = out.combined();
        assert!(
            !text.contains("no protocols available"),
            "{version}: the client could not try:\n{text}"
        );
        assert!(!out.status.success(), "{version} handshake succeeded:\n{text}");
    }
}

#[test]
fn tls_1_2_and_1_3_are_accepted() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = s_client(&env, &gw, &[flag, "-servername", DOMAIN]);
        let text = out.combined();
        assert!(out.status.success(), "{name} handshake failed:\n{text}");
        assert!(
            text.contains(&format!("New, {name}, Cipher is ")),
            "{name} not negotiated:\n{text}"
        );
    }
}

/// The `subject=` line of s_client's output with spaces removed (`subject=CN=gw.test`).
fn subject(text: &str) -> String {
    let line = text.lines().find(|l| l.starts_with("subject="));
    line.unwrap_or_default().replace(' ', "")
}

#[test]
fn certificate_is_chosen_by_sni() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let ca = env.pki.ca.display().to_string();
    // (SNI sent, name to verify, certificate expected); the first certificate is the default.
    let cases = [
        (Some("gw.test"), "gw.test", "gw.test"),
        (Some("x.gw.test"), "x.gw.test", "gw.test"),
        (Some("other.test"), "other.test", "other.test"),
        (Some("unknown.example"), "gw.test", "gw.test"),
        (None, "gw.test", "gw.test"),
    ];
    for (sni, verify, cn) in cases {
        let mut args = vec!["-CAfile", &ca, "-verify_return_error", "-verify_hostname", verify];
        match sni {
            Some(name) => args.extend(["-servername", name]),
            None => args.push("-noservername"),
        }
        let out = s_client(&env, &gw, &args);
        let text = out.combined();
        assert!(
            out.status.success(),
            "SNI {sni:?}: verification as {verify} failed:\n{text}"
        );
        assert_eq!(subject(&text), format!("subject=CN={cn}"), "SNI {sni:?}:\n{text}");
    }
}

fn connect(port: u16) -> TcpStream {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(SETUP)).unwrap();
    tcp
}

/// Reads up to the first `\n` (at most 255 bytes, the SSH identification limit).
fn read_line(stream: &mut impl Read) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 255 && !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            other => panic!("connection ended before a full line ({other:?}): {line:?}"),
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn fragmented_2kb_client_hello_with_alpn_ssh_reaches_ssh() {
    let env = TestEnv::new();
    // A long sniff timeout: the banner must come from ALPN routing, not from the silence fallback.
    let gw = env.gateway().limit("sniff_timeout", "10s").start();
    let mut alpn: Vec<Vec<u8>> = (0..9)
        .map(|i| format!("x-pad-{i}-{}", "p".repeat(190)).into_bytes())
        .collect();
    alpn.push(b"ssh".to_vec());
    let config = common::pki::client_config(&env.pki.ca_der, alpn);
    // SNI `other.test` (not the default certificate): the certificate verifies only if the
    // gateway reassembled the whole ClientHello and read its SNI.
    let sni = ServerName::try_from("other.test").unwrap();
    let mut conn = ClientConnection::new(config, sni).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert!(hello.len() >= 2000, "ClientHello is only {} bytes", hello.len());

    let mut tcp = connect(gw.port());
    for chunk in hello.chunks(100) {
        tcp.write_all(chunk).unwrap();
        tcp.flush().unwrap();
        // A pause makes each chunk its own TCP segment: this is the point of the test, not a wait.
        thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    assert_eq!(conn.alpn_protocol(), Some(&b"ssh"[..]));
    let banner = read_line(&mut rustls::Stream::new(&mut conn, &mut tcp));
    assert!(banner.starts_with("SSH-2.0-"), "not an SSH banner: {banner:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "banner took {:?}",
        started.elapsed()
    );
}

/// The banner of a client that never speaks must come after the sniff timeout (500 ms), not
/// before: an HTTP client would otherwise read SSH.
fn assert_banner_after_silence(stream: &mut impl Read, started: Instant) {
    let banner = read_line(stream);
    let waited = started.elapsed();
    assert!(banner.starts_with("SSH-2.0-"), "not an SSH banner: {banner:?}");
    assert!(
        waited >= Duration::from_millis(400),
        "banner after only {waited:?}, before the sniff timeout"
    );
}

#[test]
fn silent_tls_client_without_alpn_gets_the_ssh_banner_after_the_sniff_timeout() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let config = common::pki::client_config(&env.pki.ca_der, Vec::new());
    let mut conn = ClientConnection::new(config, ServerName::try_from(DOMAIN).unwrap()).unwrap();
    let mut tcp = connect(gw.port());
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    assert_eq!(conn.alpn_protocol(), None);
    let started = Instant::now();
    assert_banner_after_silence(&mut rustls::Stream::new(&mut conn, &mut tcp), started);
}

#[test]
fn silent_plain_tcp_client_gets_the_ssh_banner_after_the_sniff_timeout() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let mut tcp = connect(gw.port());
    let started = Instant::now();
    assert_banner_after_silence(&mut tcp, started);
}

/// `edgemux check -c` on `config`.
fn check(env: &TestEnv, config: &GatewayBuilder) -> Output {
    let mut cmd = edgemux();
    cmd.args(["check", "-c"]).arg(config.write_config());
    run_bounded(env.path(), "check", cmd, SETUP)
}

fn assert_rejected(out: &Output, words: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "check should exit 1:\n{}",
        out.combined()
    );
    for word in words {
        assert!(
            out.stderr.contains(word),
            "stderr does not name {word:?}:\n{}",
            out.stderr
        );
    }
}

#[test]
fn check_accepts_a_good_config() {
    let env = TestEnv::new();
    let out = check(&env, &env.gateway());
    assert!(
        out.status.success(),
        "check rejected a good config:\n{}",
        out.combined()
    );
}

#[test]
fn check_names_the_key_path_of_every_problem() {
    let env = TestEnv::new();
    let good = env.gateway();
    // The variants below start from a config `check` accepts, so each rejection is their doing.
    let out = check(&env, &good);
    assert!(
        out.status.success(),
        "the base config is rejected:\n{}",
        out.combined()
    );

    let unknown = good.clone().set("ssh.keepalive_maxx", 3);
    assert_rejected(&check(&env, &unknown), &["keepalive_maxx", "ssh"]);

    let bad_bind = good.listeners(&[Listener::bind("not-an-address")]);
    let out = check(&env, &bad_bind);
    assert_rejected(&out, &["listener", "bind"]);
    assert!(
        !out.stderr.contains("admin"),
        "admin blamed for the listener:\n{}",
        out.stderr
    );

    // Two bad values in one file: both are reported, each with its own path.
    let two = bad_bind.set("admin.bind", "also-bad");
    assert_rejected(&check(&env, &two), &["listener", "admin"]);
}

#[test]
fn check_validates_a_cluster_and_loads_its_secret() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new();
    let secret = env.path().join("cluster-secret");
    let made = run_bounded(
        env.path(),
        "cluster-secret",
        {
            let mut cmd = edgemux();
            cmd.arg("cluster-secret");
            cmd
        },
        SETUP,
    );
    assert!(made.status.success(), "cluster-secret:\n{}", made.combined());
    std::fs::write(&secret, &made.stdout).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let clustered = env
        .gateway()
        .set("cluster.name", "prod")
        .set("cluster.replica_name", "r1")
        .set("cluster.endpoints", vec!["http://127.0.0.1:2379"])
        .set("cluster.secret_file", secret.display().to_string())
        .set("cluster.peer.bind", "127.0.0.1:7443");
    let out = check(&env, &clustered);
    assert!(
        out.status.success(),
        "a good [cluster] is rejected:\n{}",
        out.combined()
    );

    // A secret others may read is refused by `check`, not only later by `serve`.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_rejected(&check(&env, &clustered), &["cluster.secret_file"]);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&secret, "abcd\n").unwrap();
    assert_rejected(&check(&env, &clustered), &["cluster.secret_file"]);
}

/// How long the TLS audit may take: its checks take ~30 s alone on two cores, more while other
/// tests run beside it.
const AUDIT_LIMIT: Duration = Duration::from_secs(240);
/// What testssl.sh is called on PATH: Debian's package installs `testssl`, upstream `testssl.sh`.
const TESTSSL: [&str; 2] = ["testssl", "testssl.sh"];

/// testssl.sh on the TLS port, offline: protocols (`-p`), cipher categories (`-s`), forward
/// secrecy (`-f`) and every cipher per protocol (`-E`), as flat JSON. Server cipher order (`-P`)
/// is left out on purpose: with nothing but AEAD suites with forward secrecy on offer, letting
/// the client choose is what Mozilla's TLS guidelines recommend (a phone without AES hardware
/// picks ChaCha20), while testssl.sh 3.0 still rates it HIGH.
#[test]
fn testssl_finds_nothing_worse_than_ok_in_protocols_and_ciphers() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let testssl = TESTSSL
        .iter()
        .find(|tool| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or_else(|| {
            panic!("the TLS audit needs testssl.sh; install it with: apt-get install -y testssl.sh")
        });
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let json = env.path().join("testssl.json");
    let mut cmd = Command::new(testssl);
    cmd.args(["--quiet", "--color", "0", "--warnings", "off", "--nodns", "none"])
        .args(["--connect-timeout", "10", "--openssl-timeout", "10"])
        .args(["-p", "-s", "-f", "-E", "--jsonfile"])
        .arg(&json)
        .arg(format!("127.0.0.1:{}", gw.port()));
    let out = run_bounded(env.path(), "testssl", cmd, AUDIT_LIMIT);
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("testssl wrote no JSON ({e}):\n{}", out.combined()));
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).expect("testssl JSON");
    let field = |f: &serde_json::Value, key: &str| f[key].as_str().unwrap_or_default().to_owned();
    let worse: Vec<String> = findings
        .iter()
        .filter(|f| !matches!(f["severity"].as_str(), Some("OK" | "INFO")))
        .map(|f| {
            format!(
                "{} {}: {}",
                field(f, "severity"),
                field(f, "id"),
                field(f, "finding")
            )
        })
        .collect();
    assert!(
        worse.is_empty(),
        "testssl found:\n{}\n{}",
        worse.join("\n"),
        out.stdout
    );
    // Each check really ran: a scan that failed early would have nothing to complain about.
    let finding = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .map(|f| field(f, "finding"))
    };
    for (id, want) in [
        ("SSLv2", "not offered"),
        ("SSLv3", "not offered"),
        ("TLS1", "not offered"),
        ("TLS1_1", "not offered"),
        ("TLS1_2", "offered"),
        ("TLS1_3", "offered with final"),
        ("cipherlist_NULL", "not offered"),
        ("cipherlist_aNULL", "not offered"),
        ("cipherlist_EXPORT", "not offered"),
        ("cipherlist_LOW", "not offered"),
        ("cipherlist_3DES_IDEA", "not offered"),
        ("cipherlist_AVERAGE", "not offered"),
        ("PFS", "offered"),
    ] {
        assert_eq!(finding(id).as_deref(), Some(want), "{id}:\n{}", out.stdout);
    }
    let ciphers = findings
        .iter()
        .filter(|f| field(f, "id").starts_with("cipher-tls1_"));
    assert!(
        ciphers.count() >= 2,
        "no cipher listed per protocol:\n{}",
        out.stdout
    );
}
