//! Lingering close. Closing a TCP socket with bytes from the peer still unread makes the kernel
//! send a RST instead of a FIN, and a RST makes the peer's kernel drop what it received but its
//! application has not read yet: the end of our last response. An h2 client keeps sending
//! WINDOW_UPDATEs while it downloads, so closing after the last byte cut downloads short. So the
//! stream is handed back when its user drops it, and [`Returned::linger`] closes our side, then
//! reads and discards until the peer closes too, bounded in time and bytes (nginx's
//! `lingering_close`).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::BoxStream;

/// How long a closing connection may linger; a peer that neither reads nor closes is cut then.
const LINGER_FOR: Duration = Duration::from_secs(2);
/// What a lingering connection may still read before it is cut.
const LINGER_BYTES: usize = 256 * 1024;

/// A stream that goes back to its [`Returned`] slot when dropped.
pub(crate) struct Lingering {
    inner: Option<BoxStream>,
    back: Arc<Mutex<Option<BoxStream>>>,
}

/// Where a [`Lingering`] stream goes when its user is done with it.
pub(crate) struct Returned(Arc<Mutex<Option<BoxStream>>>);

/// Wraps `stream` so that it can be closed with [`Returned::linger`] once its user dropped it.
pub(crate) fn lingering(stream: BoxStream) -> (Lingering, Returned) {
    let back = Arc::new(Mutex::new(None));
    let wrapped = Lingering {
        inner: Some(stream),
        back: back.clone(),
    };
    (wrapped, Returned(back))
}

impl Returned {
    /// Closes the returned stream: our side first (TLS close_notify and FIN), then reads until the
    /// peer closes, at most [`LINGER_FOR`] and [`LINGER_BYTES`]. Nothing to do when the stream
    /// was not returned (still in use elsewhere).
    pub(crate) async fn linger(self) {
        let taken = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut stream) = taken else { return };
        let _ = tokio::time::timeout(LINGER_FOR, async {
            if stream.shutdown().await.is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            let mut read = 0;
            while read < LINGER_BYTES {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read += n,
                }
            }
        })
        .await;
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        if let Some(stream) = self.inner.take() {
            *self.back.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream already returned")
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(s) => Pin::new(s).poll_read(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_dropped_stream_is_returned_closed_and_drained_until_the_peer_closes() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let (mut stream, returned) = lingering(Box::new(near));
        stream.write_all(b"last response").await.unwrap();
        // The peer still sends after our last byte (an h2 WINDOW_UPDATE).
        far.write_all(b"window update").await.unwrap();
        drop(stream);
        let peer = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            far.write_all(b"more").await.unwrap();
            far.shutdown().await.unwrap();
            got
        });
        returned.linger().await;
        assert_eq!(
            peer.await.unwrap(),
            b"last response",
            "our side closed after our bytes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_closes_is_cut_after_the_linger_time() {
        let (near, _far) = tokio::io::duplex(64);
        let (stream, returned) = lingering(Box::new(near));
        drop(stream);
        let started = tokio::time::Instant::now();
        returned.linger().await;
        assert_eq!(started.elapsed(), LINGER_FOR);
    }

    #[tokio::test]
    async fn a_stream_still_in_use_is_left_alone() {
        let (near, _far) = tokio::io::duplex(64);
        let (mut stream, returned) = lingering(Box::new(near));
        returned.linger().await;
        stream.write_all(b"still mine").await.unwrap();
    }
}
