//! What both ends of the peer link share: reading one frame exactly, writing one, the clock.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cluster::peer::codec::{CodecError, Parse};

/// A peer that stops answering (cut off, no RST) is noticed by the kernel: an idle connection
/// after [`KEEPALIVE_IDLE`] plus three unanswered probes a second apart, one with unacknowledged
/// data after [`USER_TIMEOUT`]. Then a kept-alive stream to it closes, or a request on it fails,
/// instead of waiting out `limits.upstream_timeout`.
pub(super) const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
pub(super) const USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sets up a peer link socket: no Nagle delay, and the dead-peer bounds above.
pub(super) fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(std::time::Duration::from_secs(1))
        .with_retries(3);
    if let Err(e) = sock
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| sock.set_tcp_user_timeout(Some(USER_TIMEOUT)))
    {
        tracing::debug!(error = %e, "peer socket options not set");
    }
}

pub(super) async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

/// Milliseconds since the Unix epoch: header timestamps.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The rustls error behind a TLS stream's I/O error, if that is what it is.
pub(super) fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

pub(super) enum FrameError {
    Invalid(CodecError),
    Io(std::io::Error),
}

/// Reads exactly one frame (a header or a reply) with its pure parser, never a byte past it:
/// after a reply, the stream's own bytes follow at once. At most `max` bytes are read.
pub(super) async fn read_frame<S, T>(
    s: &mut S,
    max: usize,
    wanted: fn(&[u8]) -> usize,
    parse: impl Fn(&[u8]) -> Parse<T>,
) -> Result<T, FrameError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(64);
    loop {
        match parse(&buf) {
            Parse::Complete { value, .. } => return Ok(value),
            Parse::Invalid(e) => return Err(FrameError::Invalid(e)),
            Parse::Incomplete => {}
        }
        let want = wanted(&buf).max(buf.len() + 1).min(max);
        if want <= buf.len() {
            return Err(FrameError::Invalid(CodecError::TooLong));
        }
        let at = buf.len();
        buf.resize(want, 0);
        s.read_exact(&mut buf[at..]).await.map_err(FrameError::Io)?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn peer_sockets_notice_a_silent_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&tcp);
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(tcp.nodelay().unwrap());
    }
}
