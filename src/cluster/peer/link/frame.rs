//! What both ends of the peer link share: reading one frame exactly, writing one, the clock.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cluster::peer::codec::{CodecError, Parse};

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
