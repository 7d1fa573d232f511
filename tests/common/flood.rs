//! Floods of idle TCP connections from chosen loopback source addresses (`127.0.0.0/8` only),
//! driven by one tokio thread. Each connection optionally writes a fixed prefix, then never sends
//! another byte; the flood records when it opened, the first bytes the gateway sent and when (and
//! how) the gateway closed it. Every wait is bounded.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How many bytes of what the gateway sent are kept per connection.
const HEAD: usize = 64;

/// One flood connection's life.
#[derive(Debug)]
pub struct Ended {
    pub source: Ipv4Addr,
    pub opened: Instant,
    /// When the gateway closed it (EOF or reset); `None` if it was still open at the flood's limit.
    pub closed: Option<Instant>,
    pub reset: bool,
    /// The first bytes the gateway sent.
    pub head: Vec<u8>,
}

impl Ended {
    /// From connect to close, if it closed.
    pub fn lifetime(&self) -> Option<Duration> {
        self.closed.map(|c| c - self.opened)
    }
}

pub struct Flood {
    connected: mpsc::Receiver<Result<usize, String>>,
    thread: Option<JoinHandle<Vec<Ended>>>,
}

impl Flood {
    /// Opens `per_source` connections from each of `sources` to `127.0.0.1:port`, writes `prefix`
    /// on each, then only reads, until the gateway closes it or `limit` (from the start) passes.
    pub fn start(
        port: u16,
        sources: &[Ipv4Addr],
        per_source: usize,
        prefix: &'static [u8],
        limit: Duration,
    ) -> Flood {
        let sources = sources.to_vec();
        let (tx, connected) = mpsc::channel();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("flood runtime");
            rt.block_on(run(port, sources, per_source, prefix, limit, tx))
        });
        Flood {
            connected,
            thread: Some(thread),
        }
    }

    /// Waits until every connection is established; panics on a connect error or after `timeout`.
    pub fn wait_connected(&self, timeout: Duration) -> usize {
        match self.connected.recv_timeout(timeout) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("flood: {e}"),
            Err(e) => panic!("flood not connected within {timeout:?}: {e}"),
        }
    }

    /// Waits for every connection to end or reach the flood's limit.
    pub fn finish(mut self) -> Vec<Ended> {
        let thread = self.thread.take().expect("flood thread");
        thread.join().expect("flood thread panicked")
    }
}

async fn run(
    port: u16,
    sources: Vec<Ipv4Addr>,
    per_source: usize,
    prefix: &'static [u8],
    limit: Duration,
    tx: mpsc::Sender<Result<usize, String>>,
) -> Vec<Ended> {
    let deadline = tokio::time::Instant::now() + limit;
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut watchers = Vec::new();
    for &source in &sources {
        for _ in 0..per_source {
            match connect(source, target, prefix).await {
                // Watched at once, so close times are measured while the rest still connect.
                Ok(stream) => {
                    let opened = Instant::now();
                    watchers.push(tokio::spawn(watch(source, opened, stream, deadline)));
                }
                Err(e) => {
                    let n = watchers.len();
                    let _ = tx.send(Err(format!("connection {n} from {source}: {e}")));
                    return Vec::new();
                }
            }
        }
    }
    let _ = tx.send(Ok(watchers.len()));
    let mut ended = Vec::with_capacity(watchers.len());
    for w in watchers {
        ended.push(w.await.expect("flood watcher"));
    }
    ended
}

async fn connect(source: Ipv4Addr, target: SocketAddr, prefix: &[u8]) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut stream = socket.connect(target).await?;
    stream.write_all(prefix).await?;
    Ok(stream)
}

async fn watch(
    source: Ipv4Addr,
    opened: Instant,
    mut stream: TcpStream,
    deadline: tokio::time::Instant,
) -> Ended {
    let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await;
        let (closed, reset) = match read {
            Err(_) => (None, false),
            Ok(Ok(0)) => (Some(Instant::now()), false),
            Ok(Err(_)) => (Some(Instant::now()), true),
            Ok(Ok(n)) => {
                let keep = n.min(HEAD.saturating_sub(head.len()));
                head.extend_from_slice(&buf[..keep]);
                continue;
            }
        };
        return Ended {
            source,
            opened,
            closed,
            reset,
            head,
        };
    }
}

/// Makes sure this process may hold `needed` open files, raising the soft limit toward the hard
/// one; panics, naming both limits, when the hard limit is too low: a smaller flood would not be
/// the test it claims to be.
pub fn ensure_open_files(needed: u64) {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit NOFILE");
    if soft >= needed {
        return;
    }
    let raised = rlimit::increase_nofile_limit(needed).expect("raise RLIMIT_NOFILE");
    assert!(
        raised >= needed,
        "this test needs {needed} open files but RLIMIT_NOFILE is soft {soft} / hard {hard}; \
         raise the hard limit (e.g. `ulimit -Hn 4096` as root) and run it again"
    );
}
