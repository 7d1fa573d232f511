//! The Debian package end to end, on this machine (as root): `scripts/package.sh --dev` builds it
//! with cargo-deb around the test build, `dpkg -i` installs it, the installed binary passes
//! `edgemux check` on the installed config and `systemd-analyze verify` passes the installed unit,
//! and `dpkg -r` removes it leaving no file but the conffile (then `dpkg -P` purges that too). The
//! machine is put back as it was (package, user, state) even when a step fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::process::run_bounded;
use common::TestEnv;

const HINT: &str = "the package test installs a .deb with dpkg: run it as root on a Debian machine, \
    with cargo-deb (cargo install cargo-deb --locked; scripts/test.sh does both)";
const BUILD: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(60);

/// Every file the package installs, as `dpkg -L` lists them (directories left out).
const FILES: &[&str] = &[
    "/usr/bin/edgemux",
    "/lib/systemd/system/edgemux.service",
    "/etc/edgemux/edgemux.toml",
    "/usr/share/bash-completion/completions/edgemux",
    "/usr/share/zsh/vendor-completions/_edgemux",
    "/usr/share/fish/vendor_completions.d/edgemux.fish",
    "/usr/share/man/man1/edgemux.1.gz",
    "/usr/share/doc/edgemux/README.md",
];

fn run(env: &TestEnv, name: &str, program: &str, args: &[&str], limit: Duration) -> common::process::Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = run_bounded(env.path(), name, cmd, limit);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}",
        out.combined()
    );
    out
}

/// dpkg's record of the package: `installed`, `config-files`, `half-configured`, …; empty when
/// it has none.
fn package_status() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "edgemux"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Puts the machine back as it was, whatever happened: the package purged, its user, group and
/// state gone.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let quiet = |program: &str, args: &[&str]| {
            let _ = Command::new(program).args(args).output();
        };
        quiet("dpkg", &["-P", "edgemux"]);
        quiet("deluser", &["--system", "edgemux"]);
        quiet("delgroup", &["--system", "edgemux"]);
        let _ = std::fs::remove_dir_all("/var/lib/edgemux");
    }
}

#[test]
fn the_deb_builds_installs_verifies_and_uninstalls_cleanly() {
    let root = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&root.stdout).trim(), "0", "{HINT}");
    assert!(Path::new("/usr/bin/dpkg").exists(), "{HINT}");
    let has_deb = Command::new("cargo").args(["deb", "--version"]).output();
    assert!(has_deb.is_ok_and(|o| o.status.success()), "{HINT}");
    let before = package_status();
    assert!(
        before.is_empty() || before == "not-installed",
        "dpkg knows an edgemux package already ({before}); remove it first: dpkg -P edgemux"
    );
    let env = TestEnv::new();
    let repo = env!("CARGO_MANIFEST_DIR");

    let script = format!("{repo}/scripts/package.sh");
    let out = run(&env, "package", "bash", &[&script, "--dev"], BUILD);
    let deb = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("package.sh printed no .deb path:\n{}", out.combined()))
        .to_owned();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        deb.ends_with(&format!("edgemux_{version}-1_amd64.deb")),
        "package name: {deb}"
    );
    let info = run(
        &env,
        "dpkg-deb-depends",
        "dpkg-deb",
        &["-f", &deb, "Depends"],
        STEP,
    );
    let depends = info.stdout.trim().to_owned();
    assert!(
        depends.split(',').any(|d| d.trim() == "adduser"),
        "Depends: {depends}"
    );

    // Installed: every file, the conffile marked as one, the system user, the state directory.
    let _cleanup = Cleanup;
    run(&env, "dpkg-i", "dpkg", &["-i", &deb], STEP);
    assert_eq!(package_status(), "installed");
    let installed = std::panic::catch_unwind(|| {
        for file in FILES {
            assert!(Path::new(file).is_file(), "{file} not installed");
        }
        let conffiles = run(
            &env,
            "conffiles",
            "dpkg-query",
            &["-W", "-f=${Conffiles}", "edgemux"],
            STEP,
        );
        assert!(
            conffiles.stdout.contains("/etc/edgemux/edgemux.toml"),
            "not a conffile: {}",
            conffiles.stdout
        );
        run(&env, "id", "id", &["edgemux"], STEP);
        let state = std::fs::metadata("/var/lib/edgemux").expect("/var/lib/edgemux");
        assert!(state.is_dir());
        let check = run(
            &env,
            "check",
            "/usr/bin/edgemux",
            &["check", "-c", "/etc/edgemux/edgemux.toml"],
            STEP,
        );
        assert!(check.stdout.contains(": ok"), "{}", check.combined());
        let verify = run(
            &env,
            "verify",
            "systemd-analyze",
            &["verify", "/lib/systemd/system/edgemux.service"],
            STEP,
        );
        let said = verify.combined();
        assert!(
            said.trim().is_empty(),
            "systemd-analyze verify complained:\n{said}"
        );
        let unit = std::fs::read_to_string("/lib/systemd/system/edgemux.service").unwrap();
        assert!(
            unit.contains("ExecStart=/usr/bin/edgemux serve") && unit.contains("\nUser=edgemux\n"),
            "{unit}"
        );
        let man = run(
            &env,
            "man",
            "sh",
            &["-c", "zcat /usr/share/man/man1/edgemux.1.gz"],
            STEP,
        );
        assert!(
            man.stdout.contains(".TH edgemux 1"),
            "not a man page:\n{}",
            man.stdout
        );
        let completions = std::fs::read_to_string("/usr/share/bash-completion/completions/edgemux").unwrap();
        assert!(
            completions.contains("ssh-config"),
            "completions lack the subcommands"
        );
    });

    // Removed: nothing left but the conffile; purge takes that too.
    run(&env, "dpkg-r", "dpkg", &["-r", "edgemux"], STEP);
    let left: Vec<&&str> = FILES.iter().filter(|f| Path::new(f).exists()).collect();
    let state_left = Path::new("/var/lib/edgemux").exists();
    let removed = package_status();
    run(&env, "dpkg-P", "dpkg", &["-P", "edgemux"], STEP);
    let after_purge = Path::new("/etc/edgemux/edgemux.toml").exists();
    if let Err(e) = installed {
        std::panic::resume_unwind(e);
    }
    assert_eq!(removed, "config-files", "after dpkg -r");
    assert_eq!(left, [&"/etc/edgemux/edgemux.toml"], "dpkg -r left these");
    assert!(!state_left, "dpkg -r left an empty /var/lib/edgemux");
    assert!(!after_purge, "dpkg -P left the conffile");
    let purged = package_status();
    assert!(
        purged.is_empty() || purged == "not-installed",
        "after dpkg -P: {purged}"
    );
}
