//! A russh channel as an `AsyncRead + AsyncWrite` stream that can never freeze its SSH session.
//!
//! russh delivers a channel's incoming data through a small per-channel queue and waits when it is
//! full, which stalls the whole connection. So each channel is drained by its own task into a
//! byte-bounded buffer; a reader that falls more than `limit` bytes behind gets its channel closed
//! instead of holding up the other channels of the tunnel.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::tunnels::ChannelSlot;

/// The stream side of a drained channel.
pub struct ChannelIo {
    rx: mpsc::UnboundedReceiver<Bytes>,
    current: Bytes,
    buffered: Arc<AtomicUsize>,
    tx: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    stats: Option<Arc<ChannelSlot>>,
}

impl std::fmt::Debug for ChannelIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelIo").finish_non_exhaustive()
    }
}

/// Starts draining `channel` and returns its stream. The channel is closed when the stream is
/// dropped, when the peer closes it, or when the reader falls `limit` bytes behind.
pub fn channel_io(channel: Channel<Msg>, limit: usize, slot: Option<ChannelSlot>) -> ChannelIo {
    let stats = slot.map(Arc::new);
    let writer = channel.make_writer();
    let (mut read_half, write_half) = channel.split();
    let (data_tx, rx) = mpsc::unbounded_channel();
    let stats_out = stats.clone();
    let buffered = Arc::new(AtomicUsize::new(0));
    let counter = buffered.clone();
    tokio::spawn(async move {
        let id = write_half.id();
        loop {
            tokio::select! {
                msg = read_half.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        if let Some(s) = &stats {
                            s.stats().bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        let total = counter.fetch_add(data.len(), Ordering::AcqRel) + data.len();
                        if total > limit {
                            tracing::info!(channel = %id, buffered = total, limit, "reader fell behind; closing channel");
                            break;
                        }
                        if data_tx.send(data).is_err() {
                            break;
                        }
                    }
                    Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                        // No more data: the reader sees EOF once the queue is drained. Keep the
                        // channel open for our writes until the stream is dropped.
                        drop(read_half);
                        data_tx.closed().await;
                        break;
                    }
                    Some(_) => {}
                },
                () = data_tx.closed() => break,
            }
        }
        let _ = write_half.close().await;
    });
    ChannelIo {
        rx,
        current: Bytes::new(),
        buffered,
        tx: Box::pin(writer),
        stats: stats_out,
    }
}

impl AsyncRead for ChannelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.current.is_empty() {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(data)) => this.current = data,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = this.current.len().min(buf.remaining());
        buf.put_slice(&this.current.split_to(n));
        this.buffered.fetch_sub(n, Ordering::AcqRel);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ChannelIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = self.tx.as_mut().poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(s)) = (&res, &self.stats) {
            s.stats().bytes_out.fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.as_mut().poll_shutdown(cx)
    }
}
