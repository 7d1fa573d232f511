//! Child processes for the tests: each one runs in its own process group (so helpers it starts,
//! such as the `openssl s_client` behind an ssh ProxyCommand, die with it), writes its output to
//! files in the test's temp dir, and is killed on drop. Every wait here has a deadline.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How often bounded polls look again.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `probe` until it yields a value or `timeout` passes; `None` on timeout.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Sends `signal` (e.g. "KILL", "STOP") to one process id, or to a whole group with `-PGID`.
pub fn send_signal(signal: &str, target: &str) {
    // Best effort: the target may already be gone, which is fine for cleanup.
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A running child with stdin kept open (so `ssh` sessions stay up) and output in files.
pub struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// Spawns `cmd` in a new process group; stdout/stderr go to `DIR/NAME.out` and `DIR/NAME.err`.
    pub fn spawn(dir: &Path, name: &str, mut cmd: Command) -> Proc {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{name}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        cmd.stdin(Stdio::piped())
            .stdout(fs::File::create(&stdout).expect("create stdout file"))
            .stderr(fs::File::create(&stderr).expect("create stderr file"))
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        let stdin = child.stdin.take();
        Proc {
            name,
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_wait())
    }

    /// Waits until stdout or stderr (as chosen) contains `needle`; panics with both on timeout.
    pub fn wait_output(&self, needle: &str, on_stderr: bool, timeout: Duration) -> String {
        let read = || {
            if on_stderr {
                self.stderr()
            } else {
                self.stdout()
            }
        };
        poll_until(timeout, || Some(read()).filter(|text| text.contains(needle))).unwrap_or_else(|| {
            panic!(
                "{}: {needle:?} not seen within {timeout:?}\n{}",
                self.name,
                self.describe()
            )
        })
    }

    /// SIGKILL to this process only: helpers in its group (a ProxyCommand) survive, as they would
    /// when a user's ssh dies.
    pub fn kill_only_self(&mut self) {
        send_signal("KILL", &self.pid().to_string());
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process keeps its sockets open but never answers again.
    pub fn freeze(&self) {
        send_signal("STOP", &self.pid().to_string());
    }

    /// Takes the child's stdin to stream into it; dropping it is EOF for the child.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// Closes stdin (EOF for the child).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Both outputs, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        send_signal("KILL", &format!("-{}", self.pid()));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

/// What a finished bounded command produced.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Asserts a client (curl) got no reply at all: it failed with nothing on stdout, as when the
    /// gateway closes the connection instead of answering.
    pub fn assert_no_reply(&self, what: &str) {
        assert!(
            !self.status.success() && self.stdout.is_empty(),
            "{what}: expected a closed connection, the client got:\n{}",
            self.combined()
        );
    }
}

/// Runs `cmd` to completion with stdin closed, killing it (and its group) after `timeout`.
pub fn run_bounded(dir: &Path, name: &str, cmd: Command, timeout: Duration) -> Output {
    let mut proc = Proc::spawn(dir, name, cmd);
    proc.close_stdin();
    let status = proc
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("{name} did not finish within {timeout:?}\n{}", proc.describe()));
    Output {
        status,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    }
}
