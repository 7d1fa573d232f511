//! `edgemux dev` as a newcomer meets it: it reports its addresses, then prints an `ssh` and a
//! `curl` command, and those commands work as printed (with the real OpenSSH client, `openssl
//! s_client` and curl, trusting the CA that dev mode generated).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::http::http_backend;
use common::process::{poll_until, run_bounded, Proc};
use common::ssh::KeyKind;
use common::{edgemux, TestEnv, SETUP};

const BODY: &str = "hello from the app behind the dev tunnel";

/// `sh -c LINE`, as a user would paste it into a shell.
fn shell(line: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", line]);
    cmd
}

/// The first line of `text` that, trimmed, starts with `prefix`.
fn line_starting<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().map(str::trim).find(|l| l.starts_with(prefix))
}

#[test]
fn dev_mode_prints_an_ssh_and_a_curl_command_that_work_as_printed() {
    let env = TestEnv::new();
    let dir = env.path();
    let (certs, home) = (dir.join("certs-dev"), dir.join("home"));
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = edgemux();
    cmd.args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--certs",
    ])
    .arg(&certs);
    // An empty HOME: no ~/.ssh key to guess an id from, so the curl line carries `<keyid>`.
    cmd.env("HOME", &home).env("RUST_LOG", "info,edgemux=debug");
    let dev = Proc::spawn(dir, "edgemux-dev", cmd);

    // The help text follows `ready`; wait until its curl line is complete.
    let printed = poll_until(SETUP, || {
        let out = dev.stdout();
        let done = out
            .split_once("curl ")
            .is_some_and(|(_, rest)| rest.contains('\n'));
        done.then_some(out)
    })
    .unwrap_or_else(|| panic!("edgemux dev printed no curl command\n{}", dev.describe()));
    let lines: Vec<&str> = printed.lines().collect();
    let port: u16 = lines[0]
        .strip_prefix("listening 127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("first line is not `listening ADDR`:\n{printed}"));
    assert!(
        lines[1].starts_with("admin 127.0.0.1:"),
        "second line is not `admin ADDR`:\n{printed}"
    );
    assert_eq!(lines[2], "ready", "third line:\n{printed}");
    let ssh_line = line_starting(&printed, "ssh ").expect("an ssh command in the help text");
    let curl_line = line_starting(&printed, "curl ").expect("a curl command in the help text");

    // Run the ssh command as printed, only with our identity and a private known_hosts file
    // inserted after `ssh `. The printed -R spec exposes port 3000, which may be in use on a dev
    // machine, so its `3000` becomes our backend's port. No -N: the session prints the URLs.
    let backend = http_backend(BODY);
    let spec = "-R myapp:80:localhost:3000 ";
    assert_eq!(ssh_line.matches(spec).count(), 1, "no `{spec}` in: {ssh_line}");
    let ssh_line = ssh_line.replacen(spec, &format!("-R myapp:80:localhost:{backend} "), 1);
    let key = env.key("dev", KeyKind::Ed25519);
    // The printed ~/.ssh/config block, as a config file of its own.
    let block: String = printed
        .lines()
        .skip_while(|l| !l.starts_with("Host "))
        .take_while(|l| !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        block.contains("ProxyCommand openssl s_client"),
        "no ssh config block in:\n{printed}"
    );
    let config = dir.join("ssh_config");
    std::fs::write(&config, &block).unwrap();
    let identity = format!(
        "ssh -F {} -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={} ",
        config.display(),
        key.private.display(),
        dir.join("known_hosts").display()
    );
    let session = Proc::spawn(dir, "dev-ssh", shell(&ssh_line.replacen("ssh ", &identity, 1)));
    let url = format!("https://myapp-{}.localhost:{port}", key.keyid);
    session.wait_output(&url, false, SETUP);

    // Then the curl command, with `<keyid>` filled in.
    assert!(
        curl_line.contains("<keyid>"),
        "no <keyid> placeholder in: {curl_line}"
    );
    let curl_line = curl_line.replace("<keyid>", &key.keyid);
    let out = run_bounded(dir, "dev-curl", shell(&curl_line), SETUP);
    assert!(
        out.status.success() && out.stdout == BODY,
        "`{curl_line}` did not return the backend's body:\n{}\n{}\n{}",
        out.combined(),
        session.describe(),
        dev.describe()
    );

    // The admin API wants the token dev mode generated, kept private in the certs directory;
    // the printed curl command carries it and lists the tunnel.
    let token_file = certs.join("admin-token");
    let token = std::fs::read_to_string(&token_file).expect("dev mode keeps its admin token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin token file mode");
    let admin_line = line_starting(&printed, "curl -H \"Authorization: Bearer ")
        .unwrap_or_else(|| panic!("no admin curl command in the help text:\n{printed}"));
    assert!(admin_line.contains(token.trim()), "{admin_line}");
    let out = run_bounded(dir, "dev-admin-curl", shell(admin_line), SETUP);
    assert!(
        out.status.success() && out.stdout.contains(&format!("myapp-{}.localhost", key.keyid)),
        "`{admin_line}` did not list the tunnel:\n{}",
        out.combined()
    );
    let anonymous = admin_line.replacen(token.trim(), "wrong", 1);
    let out = run_bounded(dir, "dev-admin-anonymous", shell(&anonymous), SETUP);
    assert!(
        !out.stdout.contains("tunnels"),
        "answered a wrong token:\n{}",
        out.stdout
    );
}
