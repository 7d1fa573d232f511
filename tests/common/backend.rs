//! Tunnel backends: small TCP servers on `127.0.0.1:0`, one thread per connection. Their accept
//! threads live until the test process ends; each connection thread ends when its peer goes away.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::RngCore;

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Binds 127.0.0.1:0 and runs `handle` on a thread per accepted connection; returns the port.
fn serve(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let port = listener.local_addr().expect("backend addr").port();
    let handle = Arc::new(handle);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let handle = Arc::clone(&handle);
            thread::spawn(move || handle(stream));
        }
    });
    port
}

/// Echoes every byte back.
pub fn echo_server() -> u16 {
    serve(|mut stream| {
        let Ok(mut reader) = stream.try_clone() else {
            return;
        };
        let _ = io::copy(&mut reader, &mut stream);
    })
}

/// Sends `id` and a newline, then closes: tells which pool member a connection reached.
pub fn id_server(id: &'static str) -> u16 {
    serve(move |mut stream| {
        let _ = stream.write_all(format!("{id}\n").as_bytes());
    })
}

/// First byte `P`: push `push_len` bytes and count them in `pushed` (a stalled reader stops the
/// count when back-pressure reaches us). First byte `E`: echo the rest.
pub fn push_or_echo_server(push_len: u64, pushed: Arc<AtomicU64>) -> u16 {
    serve(move |mut stream| {
        let mut command = [0u8; 1];
        if stream.read_exact(&mut command).is_err() {
            return;
        }
        match command[0] {
            b'P' => {
                let chunk = random_bytes(64 * 1024);
                let mut sent = 0u64;
                while sent < push_len {
                    if stream.write_all(&chunk).is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                    pushed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
            b'E' => {
                let Ok(mut reader) = stream.try_clone() else {
                    return;
                };
                let _ = io::copy(&mut reader, &mut stream);
            }
            _ => {}
        }
    })
}

/// A connected stream we can split into a reader and a writer (TCP or Unix).
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn split(&self) -> Self;
    fn set_timeout(&self, timeout: Duration);
}

impl Duplex for std::os::unix::net::UnixStream {
    fn split(&self) -> Self {
        self.try_clone().expect("clone unix stream")
    }
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).expect("set read timeout");
    }
}

impl Duplex for TcpStream {
    fn split(&self) -> Self {
        self.try_clone().expect("clone tcp stream")
    }
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).expect("set read timeout");
    }
}

/// Writes `payload` from a thread while reading the same number of bytes back, all within
/// `timeout`. Returns what came back (shorter than `payload` if the peer closed early).
pub fn round_trip<S: Duplex>(stream: S, payload: &[u8], timeout: Duration) -> Vec<u8> {
    let mut writer = stream.split();
    let owned = payload.to_vec();
    let write = thread::spawn(move || writer.write_all(&owned));
    let received = read_up_to(stream, payload.len(), timeout);
    // A write error means the peer closed: the short `received` already tells the test.
    let _ = write.join();
    received
}

/// Reads until `len` bytes, EOF, an error, or `timeout`; returns what arrived.
pub fn read_up_to<S: Duplex>(mut stream: S, len: usize, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::with_capacity(len.min(1 << 20));
    let mut buf = vec![0u8; 64 * 1024];
    while received.len() < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_timeout(left);
        let want = buf.len().min(len - received.len());
        match stream.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    received
}

/// Reads until EOF (or `timeout`), for servers that answer and close.
pub fn read_to_eof<S: Duplex>(stream: S, timeout: Duration) -> Vec<u8> {
    read_up_to(stream, usize::MAX, timeout)
}
