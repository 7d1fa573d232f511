//! Helpers for `tests/deploy.rs`: finding the kits' files, running commands with a deadline, and
//! re-rooting a config's absolute paths into a temp dir so that `edgemux check` can run on it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn deploy() -> PathBuf {
    repo().join("deploy")
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every file under `dir` whose name ends with `.{ext}`, sorted.
pub fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The path relative to the repository root, for messages.
pub fn rel(path: &Path) -> String {
    path.strip_prefix(repo()).unwrap_or(path).display().to_string()
}

/// Finds `name` on the PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `cmd` to completion, killing it after `limit`; output is captured through files so that
/// a chatty child never blocks on a full pipe.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: fs::read(&out).unwrap(),
        stderr: fs::read(&err).unwrap(),
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A deployment config copied into a temp dir with every absolute path re-rooted there.
///
/// The kits' configs name real production paths (`/etc/edgemux/authorized_keys`,
/// `/var/lib/edgemux`, `/run/credentials/edgemux.service/admin-token`, a Secret mount, …) that do
/// not exist on a test machine, and `edgemux check` refuses missing certificate files. So: every
/// string value that starts with `/` (in these configs, only path-valued keys do: binds, CIDRs,
/// URLs and names never start with `/`) becomes `<tempdir>/<path>`. What the deployment itself
/// provides at such a path (a ConfigMap's other files, say) is written there from the kit; every
/// other path gets a placeholder: `certs_dir` a directory (edgemux creates its contents), a
/// `token_file` a token (edgemux refuses an empty one), anything else an empty file (an empty
/// `authorized_keys` is valid). Nothing else in the config is changed.
pub struct Rerooted {
    /// Keeps the temp dir alive.
    pub root: tempfile::TempDir,
    pub config: PathBuf,
    /// `(key, original path)` for every path that was re-rooted.
    pub paths: Vec<(String, String)>,
}

/// Re-roots `toml_text`; `provided` are `(absolute path, contents)` the deployment puts in place.
pub fn reroot(toml_text: &str, provided: &[(String, String)]) -> Rerooted {
    let root = tempfile::tempdir().unwrap();
    let mut value: toml::Value = toml::from_str(toml_text).unwrap_or_else(|e| panic!("TOML: {e}"));
    let mut paths = Vec::new();
    reroot_value("", &mut value, root.path(), &mut paths);
    for (path, contents) in provided {
        let target = under(root.path(), path);
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::write(&target, contents).unwrap();
    }
    for (key, original) in &paths {
        let target = under(root.path(), original);
        if key == "certs_dir" {
            fs::create_dir_all(&target).unwrap();
        } else if !target.exists() {
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            let placeholder = match key.as_str() {
                "token_file" => "deploy-test-token\n".to_string(),
                "secret_file" => edgemux::cluster::peer::secret::generate().unwrap() + "\n",
                _ => String::new(),
            };
            fs::write(&target, placeholder).unwrap();
            if key == "secret_file" {
                fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
    }
    let config = root.path().join("edgemux.toml");
    fs::write(&config, toml::to_string(&value).unwrap()).unwrap();
    Rerooted { root, config, paths }
}

fn under(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

fn reroot_value(key: &str, value: &mut toml::Value, root: &Path, paths: &mut Vec<(String, String)>) {
    match value {
        toml::Value::String(s) if s.starts_with('/') => {
            paths.push((key.to_string(), s.clone()));
            *s = under(root, s).display().to_string();
        }
        toml::Value::Array(items) => {
            for item in items {
                reroot_value(key, item, root, paths);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                reroot_value(k, v, root, paths);
            }
        }
        _ => {}
    }
}

/// `edgemux check -c CONFIG`, the built binary.
pub fn edgemux_check(config: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgemux"));
    cmd.arg("check").arg("-c").arg(config);
    run(cmd, Duration::from_secs(60))
}

/// Runs `edgemux check` on a re-rooted copy of `toml_text`, panics with its output unless it
/// passes, and returns the validated config (loaded in-process from the same file) with its paths
/// turned back into the ones the kit wrote.
pub fn check_passes(origin: &str, toml_text: &str, provided: &[(String, String)]) -> edgemux::config::Config {
    let r = reroot(toml_text, provided);
    let out = edgemux_check(&r.config);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && stdout.trim_end().ends_with(": ok"),
        "`edgemux check` refused {origin} (paths re-rooted under {}: {:?}):\n{stdout}{stderr}",
        r.root.path().display(),
        r.paths,
    );
    let mut cfg = edgemux::config::load(&r.config).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let root = r.root.path();
    let unroot = |p: &mut PathBuf| {
        if let Ok(rest) = p.strip_prefix(root) {
            *p = Path::new("/").join(rest);
        }
    };
    unroot(&mut cfg.certs_dir);
    unroot(&mut cfg.ssh.host_key);
    cfg.ssh.authorized_keys.iter_mut().for_each(unroot);
    cfg.admin
        .iter_mut()
        .flat_map(|a| a.token_file.iter_mut())
        .for_each(unroot);
    cfg.acme
        .iter_mut()
        .flat_map(|a| a.root_ca.iter_mut())
        .for_each(unroot);
    for c in cfg.certificates.iter_mut().chain(cfg.local_ca.iter_mut()) {
        unroot(&mut c.cert);
        unroot(&mut c.key);
    }
    if let Some(cluster) = cfg.cluster.as_mut() {
        unroot(&mut cluster.secret_file);
        cluster.store_auth_file.iter_mut().for_each(unroot);
        if let Some(tls) = cluster.store_tls.as_mut() {
            unroot(&mut tls.ca);
            if let Some((cert, key)) = tls.identity.as_mut() {
                unroot(cert);
                unroot(key);
            }
        }
    }
    cfg
}

/// Whether a `.dockerignore` excludes `path` (relative, `/`-separated): the last matching pattern
/// wins, `!` re-includes, and a pattern that matches a directory excludes everything below it.
pub fn dockerignored(patterns: &str, path: &str) -> bool {
    let mut excluded = false;
    for line in patterns.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negate, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern: Vec<&str> = pattern.trim_matches('/').split('/').collect();
        let parts: Vec<&str> = path.split('/').collect();
        let matches = (1..=parts.len()).any(|n| glob_path(&pattern, &parts[..n]));
        if matches {
            excluded = !negate;
        }
    }
    excluded
}

/// Matches path components against pattern components; `**` spans any number of components.
fn glob_path(pattern: &[&str], parts: &[&str]) -> bool {
    match (pattern.first(), parts.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            glob_path(&pattern[1..], parts) || (!parts.is_empty() && glob_path(pattern, &parts[1..]))
        }
        (Some(p), Some(part)) => glob(p.as_bytes(), part.as_bytes()) && glob_path(&pattern[1..], &parts[1..]),
        _ => false,
    }
}

/// `*` and `?` within one path component.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) => a == b && glob(&p[1..], &s[1..]),
        _ => false,
    }
}

#[test]
fn dockerignore_matching() {
    let patterns = "# c\n.git\n**/target\ncerts/*\n!certs/README.md\n**/*.key\n";
    for (path, want) in [
        (".git/HEAD", true),
        ("target/release/edgemux", true),
        ("fuzz/target/x", true),
        ("certs/dev/ca.pem", true),
        ("certs/README.md", false),
        ("a/b.key", true),
        ("vendor/russh/Cargo.toml", false),
        ("src/main.rs", false),
    ] {
        assert_eq!(dockerignored(patterns, path), want, "{path}");
    }
}

/// `text` with its commented-out settings switched on: a line `# KEY = …`, `# [TABLE]` or
/// `# [[TABLE]]` loses its `# `; prose comments stay. The kits ship optional settings that way
/// (a wildcard certificate, the several-replicas variant), and `edgemux check` on the result
/// proves they are valid config, not just plausible text.
pub fn uncomment_settings(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let setting = line.strip_prefix("# ").filter(|rest| is_setting(rest));
        out.push_str(setting.unwrap_or(line));
        out.push('\n');
    }
    out
}

fn is_setting(line: &str) -> bool {
    if let Some(table) = line.strip_prefix('[') {
        let header = line.split('#').next().unwrap_or_default().trim_end();
        return table
            .trim_start_matches('[')
            .starts_with(|c: char| c.is_ascii_lowercase())
            && header.ends_with(']');
    }
    let Some((key, _)) = line.split_once(" = ") else {
        return false;
    };
    !key.is_empty()
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

#[test]
fn uncommenting_switches_on_settings_and_keeps_prose() {
    let text = "# Prose: keep = this? no.\n# [cluster]\n# name = \"prod\"   # why\n\
                # [[tls.certificate]]\n#not = spaced\n# A sentence = not a key\nkey = 1\n";
    assert_eq!(
        uncomment_settings(text),
        "# Prose: keep = this? no.\n[cluster]\nname = \"prod\"   # why\n\
         [[tls.certificate]]\n#not = spaced\n# A sentence = not a key\nkey = 1\n"
    );
}
