//! `Counted<S>`: counts the bytes a routed connection carries, for the `edgemux_bytes_total`
//! metric (flushed every 64 KiB and at the end) and the connection's outcome line.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Publish to the metric at least every this many bytes, so long transfers show up while running.
const FLUSH_EVERY: u64 = 64 * 1024;

/// Totals readable after the stream has been handed to a service.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    pub inbound: AtomicU64,
    pub outbound: AtomicU64,
}

pub(crate) struct Counted<S> {
    inner: S,
    route: &'static str,
    totals: Arc<Totals>,
    pending_in: u64,
    pending_out: u64,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, route: &'static str) -> (Self, Arc<Totals>) {
        let totals = Arc::new(Totals::default());
        let me = Self {
            inner,
            route,
            totals: totals.clone(),
            pending_in: 0,
            pending_out: 0,
        };
        (me, totals)
    }

    fn flush_counts(&mut self, force: bool) {
        if force || self.pending_in + self.pending_out >= FLUSH_EVERY {
            crate::metrics::bytes(self.route, self.pending_in, self.pending_out);
            self.totals.inbound.fetch_add(self.pending_in, Ordering::Relaxed);
            self.totals
                .outbound
                .fetch_add(self.pending_out, Ordering::Relaxed);
            self.pending_in = 0;
            self.pending_out = 0;
        }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.flush_counts(true);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.pending_in += n;
            self.flush_counts(false);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.pending_out += n as u64;
            self.flush_counts(false);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
