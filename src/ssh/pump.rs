//! A russh channel as an `AsyncRead + AsyncWrite` stream with real flow control.
//!
//! Stock russh re-opens a channel's window as soon as data arrives and pushes that data through
//! a small per-channel queue, waiting when it is full, so one slow reader either buffers without
//! bound or stalls the whole SSH connection. Our russh patch (vendor/russh) lets the application
//! grant window as it *consumes*: the tunnel client is slowed to the reader's pace, with at most
//! `window` bytes in flight per channel. Each channel is still drained by its own task (the queue
//! never fills, so other channels never wait), and a peer that ignores the window is cut.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelMsg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::defaults::SSH_WINDOW;
use crate::tunnels::ChannelSlot;

/// Consumption is reported in steps of at most this much (and at most 1/8 of the window), so
/// the peer always gets new window long before it runs dry.
const REPORT_STEP: usize = 256 * 1024;
/// What a peer may send beyond the windows we granted before it is cut for ignoring them.
const OVERRUN_SLACK: usize = 1024 * 1024;

/// The stream side of a drained channel.
pub(crate) struct ChannelIo {
    rx: mpsc::UnboundedReceiver<Bytes>,
    current: Bytes,
    buffered: Arc<AtomicUsize>,
    tx: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    stats: Option<Arc<ChannelSlot>>,
    flow: Flow,
    /// Tells the drain task the stream is gone, so it closes the channel.
    _dropped: DropGuard,
}

/// Reports consumption to the session so it can grant the peer more window.
struct Flow {
    handle: Handle,
    id: ChannelId,
    window: u32,
    step: usize,
    unreported: usize,
}

impl Flow {
    fn consumed(&mut self, n: usize) {
        self.unreported += n;
        if self.unreported >= self.step {
            let bytes = u32::try_from(self.unreported).unwrap_or(u32::MAX);
            let _ = self.handle.consumed(self.id, bytes, self.window);
            self.unreported = 0;
        }
    }
}

impl std::fmt::Debug for ChannelIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelIo").finish_non_exhaustive()
    }
}

/// Starts draining `channel` (which belongs to the session behind `handle`) and returns its
/// stream, with at most `window` bytes in flight. The channel is closed when the stream is
/// dropped, when the peer closes it, or when the peer overruns its window.
pub(crate) fn channel_io(
    channel: Channel<Msg>,
    handle: Handle,
    window: usize,
    slot: Option<ChannelSlot>,
) -> ChannelIo {
    let window32 = u32::try_from(window).unwrap_or(u32::MAX);
    let id = channel.id();
    // The first report switches the channel to consumer-driven flow control.
    let _ = handle.consumed(id, 0, window32);
    let limit = window.max(SSH_WINDOW as usize) + OVERRUN_SLACK;
    let stats = slot.map(Arc::new);
    let writer = channel.make_writer();
    let (read_half, write_half) = channel.split();
    let (data_tx, rx) = mpsc::unbounded_channel();
    let buffered = Arc::new(AtomicUsize::new(0));
    let dropped = CancellationToken::new();
    let queue = Queue {
        tx: data_tx,
        buffered: buffered.clone(),
        limit,
    };
    tokio::spawn(drain(
        read_half,
        write_half,
        queue,
        stats.clone(),
        dropped.clone(),
    ));
    ChannelIo {
        rx,
        current: Bytes::new(),
        buffered,
        tx: Box::pin(writer),
        stats,
        _dropped: dropped.drop_guard(),
        flow: Flow {
            handle,
            id,
            window: window32,
            step: (window / 8).clamp(1, REPORT_STEP),
            unreported: 0,
        },
    }
}

/// Where the drain task puts incoming data for the stream.
struct Queue {
    tx: mpsc::UnboundedSender<Bytes>,
    buffered: Arc<AtomicUsize>,
    limit: usize,
}

async fn drain(
    mut read_half: russh::ChannelReadHalf,
    write_half: russh::ChannelWriteHalf<Msg>,
    queue: Queue,
    stats: Option<Arc<ChannelSlot>>,
    dropped: CancellationToken,
) {
    let id = write_half.id();
    loop {
        let msg = tokio::select! {
            msg = read_half.wait() => msg,
            () = dropped.cancelled() => break,
        };
        match msg {
            Some(ChannelMsg::Data { data }) => {
                if let Some(s) = &stats {
                    s.stats().bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                let total = queue.buffered.fetch_add(data.len(), Ordering::AcqRel) + data.len();
                if total > queue.limit {
                    tracing::info!(channel = %id, buffered = total, limit = queue.limit, "peer overran its window; closing channel");
                    break;
                }
                if queue.tx.send(data).is_err() {
                    break;
                }
            }
            Some(ChannelMsg::Eof) => {
                // Half-close: the reader sees EOF once the queue is drained; our side may still
                // write until the stream is dropped.
                drop(queue);
                drop(read_half);
                dropped.cancelled().await;
                break;
            }
            // The peer closed the channel, or its whole session is gone.
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    let _ = write_half.close().await;
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
        this.flow.consumed(n);
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
