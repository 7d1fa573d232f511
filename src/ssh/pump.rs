//! A russh channel as an `AsyncRead + AsyncWrite` stream with real flow control.
//!
//! Stock russh re-opens a channel's window as soon as data arrives and pushes that data through
//! a small per-channel queue, waiting when it is full, so one slow reader either buffers without
//! bound or stalls the whole SSH connection. Our russh patch (vendor/russh) lets the application
//! grant window as it *consumes*: the tunnel client is slowed to the reader's pace, with at most
//! `window` bytes in flight per channel. Each channel is still drained by its own task (the queue
//! never fills, so other channels never wait), and a peer that ignores the window is cut.
//!
//! The window follows the reader's pace: it starts at the budget's floor, doubles while the
//! reader takes it faster than it is granted, falls to what the reader takes in [`PACE`] when it
//! is slower, and never passes `ssh.channel_buffer`. Every window is leased from the tunnel buffer
//! budget (`crate::budget`), which may hold growth back; a reader that stops reading keeps only
//! the window it had, and the tunnel client waits. Nothing is dropped.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelMsg};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::budget::{Lease, FLOOR_WINDOW};
use crate::tunnels::ChannelSlot;

/// Consumption is reported in steps of at most this much (and at most 1/8 of the window), so
/// the peer always gets new window long before it runs dry.
const REPORT_STEP: usize = 256 * 1024;
/// What a peer may send beyond the window we granted before it is cut for ignoring it: one
/// 32 KiB packet (ssh `MAX_PACKET`) and then some.
const OVERRUN_SLACK: usize = 64 * 1024;
/// A window holds this long of its reader's pace: a tunnel path with up to this round trip stays
/// busy for a reader that keeps up.
const PACE: Duration = Duration::from_secs(1);
/// Packets smaller than this are copied together, so a peer that sends one byte per packet costs
/// no more memory per byte than one that sends full packets.
const COALESCE_BELOW: usize = 4 * 1024;

/// Who pays for a channel's window: a tunnel member's channel (charged to the visitor using it),
/// or an `ssh -L` visitor's own channel.
#[derive(Debug)]
pub(crate) enum Ledger {
    Slot(Arc<ChannelSlot>),
    Lease(Lease),
}

impl Ledger {
    fn window(&mut self, want: usize, outstanding: usize) -> usize {
        match self {
            Self::Slot(slot) => slot.window(want, outstanding),
            Self::Lease(lease) => lease.fit(want, outstanding),
        }
    }

    fn slot(&self) -> Option<Arc<ChannelSlot>> {
        match self {
            Self::Slot(slot) => Some(slot.clone()),
            Self::Lease(_) => None,
        }
    }
}

/// The stream side of a drained channel.
pub(crate) struct ChannelIo {
    inbox: Arc<Inbox>,
    tx: Pin<Box<dyn AsyncWrite + Send + Sync>>,
    stats: Option<Arc<ChannelSlot>>,
    flow: Flow,
    /// Tells the drain task the stream is gone, so it closes the channel.
    _dropped: DropGuard,
}

/// Reports consumption to the session so it can grant the peer more window, and sizes it.
struct Flow {
    handle: Handle,
    id: ChannelId,
    ledger: Ledger,
    window: usize,
    max_window: usize,
    /// The most the peer may still send plus what it sent and was not reported consumed: what
    /// the lease must cover.
    outstanding: usize,
    unreported: usize,
    /// Since when the reader's pace is measured, and what it took since.
    since: Instant,
    taken: usize,
}

impl Flow {
    fn step(&self) -> usize {
        (self.window / 8).clamp(1, REPORT_STEP)
    }

    fn consumed(&mut self, n: usize, inbox: &Inbox) {
        self.unreported += n;
        self.taken += n;
        if self.unreported < self.step() {
            return;
        }
        let want = self.pace();
        let outstanding = self.outstanding.saturating_sub(self.unreported);
        self.window = self.ledger.window(want, outstanding);
        self.outstanding = outstanding.max(self.window);
        inbox.allowed.store(self.outstanding, Ordering::Release);
        let bytes = u32::try_from(self.unreported).unwrap_or(u32::MAX);
        let window = u32::try_from(self.window).unwrap_or(u32::MAX);
        let _ = self.handle.consumed(self.id, bytes, window);
        self.unreported = 0;
    }

    /// The window the reader's pace asks for: what it takes in [`PACE`], at most twice the
    /// current window; unchanged until it has taken half the window or a [`PACE`] has passed.
    fn pace(&mut self) -> usize {
        let elapsed = self.since.elapsed();
        if self.taken < self.window / 2 && elapsed < PACE {
            return self.window;
        }
        let micros = elapsed.as_micros().max(1);
        let per_pace = self.taken as u128 * PACE.as_micros() / micros;
        (self.since, self.taken) = (Instant::now(), 0);
        let ceiling = (self.window * 2).min(self.max_window);
        usize::try_from(per_pace)
            .unwrap_or(usize::MAX)
            .min(ceiling)
            .max(FLOOR_WINDOW)
    }
}

impl std::fmt::Debug for ChannelIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelIo").finish_non_exhaustive()
    }
}

/// Starts draining `channel` (which belongs to the session behind `handle`) and returns its
/// stream, with a window of at most `max_window` paid for by `ledger`. The channel is closed when
/// the stream is dropped, when the peer closes it, or when the peer overruns its window.
///
/// The session must have granted the channel [`FLOOR_WINDOW`] when it was opened (the SSH
/// server's `window_size`): that is where the window starts.
pub(crate) fn channel_io(
    channel: Channel<Msg>,
    handle: Handle,
    max_window: usize,
    ledger: Ledger,
) -> ChannelIo {
    let id = channel.id();
    // The first report switches the channel to consumer-driven flow control.
    let _ = handle.consumed(id, 0, FLOOR_WINDOW as u32);
    let stats = ledger.slot();
    let writer = channel.make_writer();
    let (read_half, write_half) = channel.split();
    let inbox = Arc::new(Inbox {
        queued: Mutex::default(),
        allowed: AtomicUsize::new(FLOOR_WINDOW),
    });
    let dropped = CancellationToken::new();
    tokio::spawn(drain(
        read_half,
        write_half,
        inbox.clone(),
        stats.clone(),
        dropped.clone(),
    ));
    ChannelIo {
        inbox,
        tx: Box::pin(writer),
        stats,
        _dropped: dropped.drop_guard(),
        flow: Flow {
            handle,
            id,
            ledger,
            window: FLOOR_WINDOW,
            max_window,
            outstanding: FLOOR_WINDOW,
            unreported: 0,
            since: Instant::now(),
            taken: 0,
        },
    }
}

/// Incoming data waiting for the reader.
struct Inbox {
    queued: Mutex<Queued>,
    /// What the peer may have sent and we not consumed (`Flow::outstanding`).
    allowed: AtomicUsize,
}

#[derive(Default)]
struct Queued {
    chunks: VecDeque<Bytes>,
    /// Small packets, copied together; always after `chunks`.
    tail: BytesMut,
    buffered: usize,
    ended: bool,
    reader: Option<Waker>,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `data` for the reader; `Err(buffered)` when the peer overran its window.
    fn push(&self, data: Bytes) -> Result<(), usize> {
        let mut q = self.lock();
        q.buffered += data.len();
        if q.buffered > self.allowed.load(Ordering::Acquire) + OVERRUN_SLACK {
            return Err(q.buffered);
        }
        if data.len() < COALESCE_BELOW {
            q.tail.extend_from_slice(&data);
        } else {
            if !q.tail.is_empty() {
                let small = q.tail.split().freeze();
                q.chunks.push_back(small);
            }
            q.chunks.push_back(data);
        }
        if let Some(reader) = q.reader.take() {
            reader.wake();
        }
        Ok(())
    }

    /// No more data will come; the reader sees EOF once it has read what is queued.
    fn end(&self) {
        let mut q = self.lock();
        q.ended = true;
        if let Some(reader) = q.reader.take() {
            reader.wake();
        }
    }
}

impl Queued {
    /// Copies as much as fits into `buf`; returns how much.
    fn read_into(&mut self, buf: &mut ReadBuf<'_>) -> usize {
        let mut n = 0;
        while buf.remaining() > 0 {
            let chunk = match self.chunks.front_mut() {
                Some(chunk) => chunk,
                None if !self.tail.is_empty() => {
                    let take = self.tail.len().min(buf.remaining());
                    buf.put_slice(&self.tail[..take]);
                    self.tail.advance(take);
                    n += take;
                    break;
                }
                None => break,
            };
            let take = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..take]);
            chunk.advance(take);
            if chunk.is_empty() {
                self.chunks.pop_front();
            }
            n += take;
        }
        self.buffered -= n;
        n
    }
}

async fn drain(
    mut read_half: russh::ChannelReadHalf,
    write_half: russh::ChannelWriteHalf<Msg>,
    inbox: Arc<Inbox>,
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
                if let Err(buffered) = inbox.push(data) {
                    let allowed = inbox.allowed.load(Ordering::Acquire);
                    tracing::info!(channel = %id, buffered, allowed, "peer overran its window; closing channel");
                    break;
                }
            }
            Some(ChannelMsg::Eof) => {
                // Half-close: the reader sees EOF once the queue is drained; our side may still
                // write until the stream is dropped.
                inbox.end();
                drop(read_half);
                dropped.cancelled().await;
                break;
            }
            // The peer closed the channel, or its whole session is gone.
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    inbox.end();
    let _ = write_half.close().await;
}

impl AsyncRead for ChannelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let n = {
            let mut q = this.inbox.lock();
            let n = q.read_into(buf);
            if n == 0 {
                if !q.ended {
                    q.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                return Poll::Ready(Ok(()));
            }
            n
        };
        this.flow.consumed(n, &this.inbox);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_packets_are_copied_together_and_read_in_order() {
        let inbox = Inbox {
            queued: Mutex::default(),
            allowed: AtomicUsize::new(1 << 20),
        };
        for i in 0..1000u32 {
            assert!(inbox.push(Bytes::copy_from_slice(&[i as u8])).is_ok());
        }
        assert!(inbox.push(Bytes::from(vec![7u8; 8192])).is_ok());
        assert!(inbox.push(Bytes::copy_from_slice(b"end")).is_ok());
        let mut q = inbox.lock();
        assert_eq!(
            q.chunks.len(),
            2,
            "1,000 one-byte packets in one chunk, then the large one"
        );
        let mut out = vec![0u8; 10_000];
        let mut buf = ReadBuf::new(&mut out);
        assert_eq!(q.read_into(&mut buf), 1000 + 8192 + 3);
        let got = buf.filled();
        assert!(got[..1000].iter().enumerate().all(|(i, b)| *b == i as u8));
        assert!(got.ends_with(b"\x07end"));
        assert_eq!(q.buffered, 0);
    }

    #[test]
    fn a_peer_that_sends_past_its_window_is_refused() {
        let inbox = Inbox {
            queued: Mutex::default(),
            allowed: AtomicUsize::new(FLOOR_WINDOW),
        };
        let packet = Bytes::from(vec![0u8; 32 * 1024]);
        let sent = (0..6)
            .map(|_| inbox.push(packet.clone()))
            .filter(Result::is_ok)
            .count();
        assert_eq!(sent, (FLOOR_WINDOW + OVERRUN_SLACK) / packet.len());
    }
}
