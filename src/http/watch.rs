//! Timers that end HTTP work nobody is doing: a response whose visitor takes nothing for
//! `limits.write_idle_timeout` is cut (the HTTP/1.1 connection closed, the h2 stream reset), and
//! an h2 connection without a stream for `limits.header_timeout` is closed.
//!
//! hyper polls a response body only when it can send what it gets: an HTTP/1.1 connection once
//! its write queue has room, an h2 stream once the visitor's flow window has. So a body that has
//! handed hyper a frame and is not polled again is waiting for its visitor. [`Watched`] tells
//! its [`ResponseWatch`] when that wait began; the task that owns the response (the connection for
//! HTTP/1.1, the stream's own task for h2, see [`StreamExec`]) ends it when the wait is too long.
//! Frames are handed out at most [`FRAME`] at a time, so a visitor reading at any pace above
//! `FRAME` per `write_idle_timeout` (16 KiB a minute by default) never waits that long.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::{Buf, Bytes};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// The most a response hands hyper at once: one TLS record, and h2's default frame size.
pub(super) const FRAME: usize = 16 * 1024;

tokio::task_local! {
    /// The watch of the h2 stream whose task is running (set by [`StreamExec`]).
    static STREAM: Arc<ResponseWatch>;
}

/// When a response began waiting for its visitor, if it is.
#[derive(Debug, Default)]
pub(super) struct ResponseWatch {
    waiting_since: Mutex<Option<Instant>>,
    started: Notify,
}

impl ResponseWatch {
    /// The watch of the h2 stream this task serves, else `fallback` (the HTTP/1.1 connection's).
    pub(super) fn current_or(fallback: &Arc<Self>) -> Arc<Self> {
        STREAM.try_with(Arc::clone).unwrap_or_else(|_| fallback.clone())
    }

    fn set(&self, waiting: bool) {
        let mut since = self.waiting_since.lock().unwrap_or_else(|p| p.into_inner());
        let was = since.is_some();
        *since = waiting.then(Instant::now);
        if waiting && !was {
            self.started.notify_one();
        }
    }

    fn since(&self) -> Option<Instant> {
        *self.waiting_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once a response has waited `timeout` for its visitor.
    pub(super) async fn stalled(&self, timeout: Duration) {
        loop {
            match self.since() {
                None => self.started.notified().await,
                Some(since) if since.elapsed() >= timeout => return,
                // Woken early when the visitor took more meanwhile; the loop looks again.
                Some(since) => tokio::time::sleep_until(since + timeout).await,
            }
        }
    }
}

/// Logs and counts a response cut for its visitor's silence.
pub(super) fn cut(protocol: &'static str, timeout: Duration) {
    crate::metrics::response_cut(protocol);
    tracing::info!(
        protocol,
        ?timeout,
        "response cut: the visitor took nothing for limits.write_idle_timeout"
    );
}

/// A response body that tells its watch whether it waits for the visitor, and hands hyper at
/// most [`FRAME`] bytes at a time.
pub(super) struct Watched<B> {
    inner: B,
    /// The rest of a data frame larger than [`FRAME`].
    rest: Bytes,
    watch: Arc<ResponseWatch>,
}

impl<B> Watched<B> {
    pub(super) fn new(inner: B, watch: Arc<ResponseWatch>) -> Self {
        Self {
            inner,
            rest: Bytes::new(),
            watch,
        }
    }

    /// The next slice of `data`, keeping the remainder for the next poll.
    fn hand(&mut self, mut data: Bytes) -> Frame<Bytes> {
        if data.len() > FRAME {
            self.rest = data.split_off(FRAME);
        }
        self.watch.set(true);
        Frame::data(data)
    }
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        self.watch.set(false);
    }
}

impl<B> HttpBody for Watched<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.rest.has_remaining() {
            let rest = std::mem::take(&mut this.rest);
            return Poll::Ready(Some(Ok(this.hand(rest))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(this.hand(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => {
                // Waiting for the tunnel, or done: either way not for the visitor.
                this.watch.set(false);
                other
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// Runs an h2 connection's streams, each in its own task under its own [`ResponseWatch`] (cut
/// after `write_idle` of waiting), and counts them so an idle connection can be told.
#[derive(Clone)]
pub(super) struct StreamExec {
    live: Arc<watch::Sender<usize>>,
    write_idle: Duration,
}

impl StreamExec {
    pub(super) fn new(write_idle: Duration) -> Self {
        Self {
            live: Arc::new(watch::Sender::new(0)),
            write_idle,
        }
    }

    /// Resolves once the connection has had no stream for `timeout`.
    pub(super) async fn idle(&self, timeout: Duration) {
        let mut live = self.live.subscribe();
        loop {
            if live.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            let busy = tokio::time::timeout(timeout, live.wait_for(|n| *n > 0)).await;
            if busy.is_err() {
                return;
            }
        }
    }
}

/// Counts a stream while its task lives.
struct Live(Arc<watch::Sender<usize>>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.live.send_modify(|n| *n += 1);
        let live = Live(self.live.clone());
        let (watch, write_idle) = (Arc::new(ResponseWatch::default()), self.write_idle);
        tokio::spawn(async move {
            let _live = live;
            tokio::select! {
                () = STREAM.scope(watch.clone(), stream) => {}
                // Dropping the stream's future resets it (RST_STREAM) and frees what it held.
                () = watch.stalled(write_idle) => cut("h2", write_idle),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test(start_paused = true)]
    async fn a_frame_not_taken_within_the_timeout_is_a_stall() {
        let watch = Arc::new(ResponseWatch::default());
        let big = Bytes::from(vec![1u8; 3 * FRAME + 1]);
        let mut body = Watched::new(Full::new(big), watch.clone());
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), FRAME, "handed a frame at a time");
        assert_eq!(body.size_hint().exact(), Some(2 * FRAME as u64 + 1));
        let stalled = tokio::time::timeout(Duration::from_secs(3), watch.stalled(Duration::from_secs(2)));
        assert!(stalled.await.is_ok(), "not taken for 2 s");
        let mut rest = 0;
        while let Some(frame) = body.frame().await {
            rest += frame.unwrap().into_data().unwrap().len();
        }
        assert_eq!(rest, 2 * FRAME + 1);
        let done = tokio::time::timeout(Duration::from_secs(60), watch.stalled(Duration::from_secs(2)));
        assert!(done.await.is_err(), "a finished body waits for no one");
    }
}
