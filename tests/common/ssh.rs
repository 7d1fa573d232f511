//! The real OpenSSH client against the gateway: through TLS (an `openssl s_client` ProxyCommand
//! that verifies the gateway's certificate, with or without ALPN `ssh`) or as raw SSH on the port.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use super::backend::read_to_eof;
use super::process::{poll_until, run_bounded, Output, Proc};
use super::{fingerprint, keyid, DOMAIN, SETUP};

#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    Ed25519,
    Ecdsa,
    Rsa,
}

/// A client key pair made by `ssh-keygen`, with the key id the gateway gives it and its full
/// fingerprint (what the config names keys by).
#[derive(Clone, Debug)]
pub struct SshKey {
    pub private: PathBuf,
    pub public: PathBuf,
    pub keyid: String,
    pub fingerprint: String,
}

impl SshKey {
    pub fn generate(dir: &Path, name: &str, kind: KeyKind) -> SshKey {
        let private = dir.join(format!("id_{name}"));
        let kind_arg = match kind {
            KeyKind::Ed25519 => "ed25519",
            KeyKind::Ecdsa => "ecdsa",
            KeyKind::Rsa => "rsa",
        };
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", kind_arg, "-N", "", "-C", name, "-f"])
            .arg(&private)
            .output()
            .expect("run ssh-keygen");
        assert!(
            out.status.success(),
            "ssh-keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let public = private.with_extension("pub");
        let keyid = keyid(&public);
        let fingerprint = fingerprint(&public);
        SshKey {
            private,
            public,
            keyid,
            fingerprint,
        }
    }

    /// The full tunnel host for `name` under this key: `NAME-KEYID.gw.test`.
    pub fn host(&self, name: &str) -> String {
        format!("{name}-{}.{DOMAIN}", self.keyid)
    }
}

/// How the ssh client reaches the gateway's one port.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    /// TLS without ALPN: the gateway must sniff `SSH-2.0-` in the decrypted bytes.
    Tls,
    /// TLS with ALPN `ssh`.
    TlsAlpnSsh,
    /// SSH straight on the TCP port, no TLS.
    Raw,
}

pub struct SshClient {
    pub(crate) dir: PathBuf,
    pub(crate) port: u16,
    pub(crate) ca: PathBuf,
    pub key: SshKey,
    pub transport: Transport,
    pub user: String,
}

impl SshClient {
    /// Same client, another SSH user name (the default tunnel name for `-R PORT:...`).
    pub fn with_user(mut self, user: &str) -> SshClient {
        user.clone_into(&mut self.user);
        self
    }

    /// `ssh OPTIONS... DEFAULTS... DESTINATION REMOTE...`; ssh keeps the first value of an option,
    /// so `options` override the defaults.
    pub fn command(&self, options: &[&str], remote: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(options)
            .args(["-F", "/dev/null", "-i"])
            .arg(&self.key.private);
        for option in [
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "ExitOnForwardFailure=yes",
            "ServerAliveInterval=2",
            "ServerAliveCountMax=5",
            "ConnectTimeout=15",
        ] {
            cmd.args(["-o", option]);
        }
        cmd.args(["-l", &self.user]);
        let alpn = match self.transport {
            Transport::Raw => {
                cmd.args(["-p", &self.port.to_string(), "127.0.0.1"]);
                return with_remote(cmd, remote);
            }
            Transport::Tls => "",
            Transport::TlsAlpnSsh => " -alpn ssh",
        };
        let proxy = format!(
            "ProxyCommand=openssl s_client -quiet -verify_quiet -verify_return_error -CAfile {} \
             -verify_hostname {DOMAIN} -connect 127.0.0.1:{} -servername {DOMAIN}{alpn}",
            self.ca.display(),
            self.port
        );
        cmd.args(["-o", &proxy, DOMAIN]);
        with_remote(cmd, remote)
    }

    /// Starts ssh in the background (stdin kept open until the `Proc` drops).
    pub fn spawn(&self, name: &str, options: &[&str], remote: &[&str]) -> Proc {
        Proc::spawn(&self.dir, name, self.command(options, remote))
    }

    /// Runs a remote command to completion (bounded).
    pub fn run(&self, remote: &[&str]) -> Output {
        run_bounded(&self.dir, "ssh-run", self.command(&[], remote), SETUP)
    }

    /// `ssh gw tunnels`, parsed; panics unless it succeeds with JSON.
    pub fn tunnels(&self) -> Value {
        let out = self.run(&["tunnels"]);
        assert!(
            out.status.success(),
            "`ssh gw tunnels` failed: {}",
            out.combined()
        );
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("`tunnels` is not JSON ({e}): {:?}", out.stdout))
    }

    /// The `tunnels` entry named `name`, if this key has one.
    pub fn find_tunnel(&self, name: &str) -> Option<Value> {
        let list = self.tunnels();
        let entries = list["tunnels"].as_array().cloned().unwrap_or_default();
        entries.into_iter().find(|t| t["name"] == name)
    }

    /// Polls `tunnels` until `name` is listed; panics after the setup deadline.
    pub fn wait_tunnel(&self, name: &str, holder: &Proc) -> Value {
        poll_until(SETUP, || self.find_tunnel(name))
            .unwrap_or_else(|| panic!("tunnel {name:?} never listed in `tunnels`\n{}", holder.describe()))
    }

    /// `ssh -N -R NAME:PORT:127.0.0.1:BACKEND`, returned once `tunnels` lists NAME.
    pub fn open_tunnel(&self, name: &str, port: u16, backend: u16) -> Proc {
        let holder = self.remote_forward(&format!("{name}:{port}:127.0.0.1:{backend}"));
        self.wait_tunnel(name, &holder);
        holder
    }

    /// `ssh -N -R SPEC`, kept running.
    pub fn remote_forward(&self, spec: &str) -> Proc {
        self.spawn("ssh-R", &["-N", "-R", spec], &[])
    }

    /// `ssh -N -L SOCKET:TARGET` with a local Unix socket (no local port to race for).
    pub fn local_forward(&self, target: &str) -> LocalForward {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let socket = self
            .dir
            .join(format!("fwd-{}.sock", COUNTER.fetch_add(1, Ordering::Relaxed)));
        let spec = format!("{}:{target}", socket.display());
        let proc = self.spawn("ssh-L", &["-N", "-L", &spec], &[]);
        LocalForward { proc, socket }
    }
}

fn with_remote(mut cmd: Command, remote: &[&str]) -> Command {
    cmd.args(remote);
    cmd
}

/// A running `ssh -L` whose local end is a Unix socket.
pub struct LocalForward {
    pub proc: Proc,
    pub socket: PathBuf,
}

impl LocalForward {
    /// Connects to the local end, retrying until ssh listens (bounded).
    pub fn connect(&self) -> UnixStream {
        poll_until(SETUP, || UnixStream::connect(&self.socket).ok()).unwrap_or_else(|| {
            panic!(
                "ssh -L never listened on {}\n{}",
                self.socket.display(),
                self.proc.describe()
            )
        })
    }

    /// Asserts the gateway refused the channel behind this forward: a local connection closes
    /// without a byte, and ssh reports the failed open.
    pub fn assert_channel_refused(&self, what: &str) {
        let mut conn = self.connect();
        let _ = conn.write_all(b"anyone there?\n");
        let got = read_to_eof(conn, SETUP);
        assert!(
            got.is_empty(),
            "{what}: expected no data, got {:?}",
            String::from_utf8_lossy(&got)
        );
        self.proc.wait_output("open failed", true, SETUP);
    }
}
