//! The SSH endpoint's algorithms: ssh-audit (pinned, installed by `scripts/test.sh` in a
//! virtualenv) finds no failure and no warning on the plain-SSH port, the lists are the ones
//! `ssh::ALGORITHMS` documents, and logins signed with SHA-1 (`ssh-rsa`) are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::process::run_bounded;
use common::russh_client::Scripted;
use common::ssh::{KeyKind, Transport};
use common::{TestEnv, SETUP};
use russh::client::AuthResult;
use russh::keys::HashAlg;
use serde_json::Value;

/// Where the ssh-audit to run is named, when not in the test command's virtualenv.
const SSH_AUDIT_ENV: &str = "EDGEMUX_SSH_AUDIT";
const SSH_AUDIT_HINT: &str = "run `bash scripts/test.sh` once (it installs ssh-audit into \
    target/venv), or: python3 -m venv target/venv && target/venv/bin/pip install \
    ssh-audit==3.3.0 (Debian needs `apt-get install -y python3-venv`), or point \
    EDGEMUX_SSH_AUDIT at an ssh-audit 3.3.0";

/// `$EDGEMUX_SSH_AUDIT`, else the one `scripts/test.sh` installs under the target directory;
/// panics with the install hint when neither exists (this test never skips).
fn ssh_audit() -> PathBuf {
    let path = std::env::var_os(SSH_AUDIT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // CARGO_TARGET_TMPDIR is `<target dir>/tmp`.
            let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            target.parent().unwrap().join("venv/bin/ssh-audit")
        });
    assert!(
        path.is_file(),
        "ssh-audit not found at {}; {SSH_AUDIT_HINT}",
        path.display()
    );
    path
}

/// The algorithm names ssh-audit lists under `section` ("kex", "key", "enc", "mac").
fn names(report: &Value, section: &str) -> Vec<String> {
    let entries = report[section].as_array().cloned().unwrap_or_default();
    entries
        .iter()
        .map(|e| e["algorithm"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Every `fail` and `warn` note ssh-audit gives, with its algorithm, plus CVEs and
/// recommendations.
fn complaints(report: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for section in ["kex", "key", "enc", "mac"] {
        for entry in report[section].as_array().cloned().unwrap_or_default() {
            for level in ["fail", "warn"] {
                for note in entry["notes"][level].as_array().cloned().unwrap_or_default() {
                    found.push(format!("[{level}] {section} {}: {note}", entry["algorithm"]));
                }
            }
        }
    }
    for cve in report["cves"].as_array().cloned().unwrap_or_default() {
        found.push(format!("[cve] {cve}"));
    }
    let recommendations = &report["recommendations"];
    if recommendations.as_object().is_some_and(|r| !r.is_empty()) {
        found.push(format!("[recommendations] {recommendations}"));
    }
    found
}

#[test]
fn ssh_audit_finds_no_failure_and_no_warning() {
    let audit = ssh_audit();
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let mut cmd = Command::new(&audit);
    cmd.args(["-j", "-p", &gw.port().to_string(), "127.0.0.1"]);
    let out = run_bounded(env.path(), "ssh-audit", cmd, SETUP);
    let report: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ssh-audit printed no JSON ({e}):\n{}", out.combined()));
    for section in ["kex", "key", "enc", "mac"] {
        println!("ssh-audit {section}: {}", names(&report, section).join(", "));
    }
    println!("ssh-audit compression: {}", report["compression"]);
    for note in report["additional_notes"].as_array().cloned().unwrap_or_default() {
        println!("ssh-audit note: {note}");
    }
    let found = complaints(&report);
    assert!(found.is_empty(), "ssh-audit complains:\n{}", found.join("\n"));
    // 0 is "everything good"; 1 warnings, 2 failures, 3 and up errors.
    assert_eq!(
        out.status.code(),
        Some(0),
        "ssh-audit exit status\n{}",
        out.combined()
    );

    let kex = [
        "mlkem768x25519-sha256",
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ext-info-s",
        "kex-strict-s-v00@openssh.com",
    ];
    assert_eq!(names(&report, "kex"), kex);
    assert_eq!(names(&report, "key"), ["ssh-ed25519"]);
    let enc = [
        "chacha20-poly1305@openssh.com",
        "aes256-gcm@openssh.com",
        "aes128-gcm@openssh.com",
        "aes256-ctr",
        "aes192-ctr",
        "aes128-ctr",
    ];
    assert_eq!(names(&report, "enc"), enc);
    let mac = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"];
    assert_eq!(names(&report, "mac"), mac);
    assert_eq!(report["compression"], serde_json::json!(["none"]));
}

#[test]
fn ssh_rsa_sha1_login_signatures_are_refused_and_rsa_sha2_ones_accepted() {
    let env = TestEnv::new();
    let gw = env.gateway().start();
    let rsa = env.key("r", KeyKind::Rsa);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // russh signs with whatever it is told, so this one really sends an ssh-rsa signature.
        let mut sha1 = Scripted::connect(gw.port(), None).await;
        let auth = sha1.try_login(&rsa, None).await;
        assert!(
            matches!(auth, AuthResult::Failure { .. }),
            "ssh-rsa (SHA-1): {auth:?}"
        );
        let mut sha2 = Scripted::connect(gw.port(), None).await;
        let auth = sha2.try_login(&rsa, Some(HashAlg::Sha256)).await;
        assert!(matches!(auth, AuthResult::Success), "rsa-sha2-256: {auth:?}");
    });
    gw.wait_log(&["ssh-rsa (SHA-1) login signature refused"]);

    // OpenSSH reads `server-sig-algs`: told to sign only with ssh-rsa it finds nothing in
    // common and does not try; by default it signs with rsa-sha2-512 and gets in.
    let client = gw.ssh(&rsa, Transport::Raw);
    let only_sha1 = ["-v", "-o", "PubkeyAcceptedAlgorithms=ssh-rsa"];
    let out = run_bounded(
        env.path(),
        "ssh-sha1",
        client.command(&only_sha1, &["tunnels"]),
        SETUP,
    );
    let refused = !out.status.success() && out.stderr.contains("no mutual signature algorithm");
    assert!(refused, "OpenSSH allowed only ssh-rsa:\n{}", out.combined());
    let out = client.run(&["tunnels"]);
    assert!(
        out.status.success(),
        "OpenSSH with an RSA key:\n{}",
        out.combined()
    );
}
