//! The access log: one line per request, written when the response body is done (or dropped), so
//! it carries the bytes sent and the full duration.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Bytes;

use super::Body;

/// What the access line says about a request.
#[derive(Debug)]
pub(super) struct Entry {
    pub client: SocketAddr,
    pub host: String,
    pub method: http::Method,
    pub path: String,
    pub version: http::Version,
    pub status: u16,
    pub started: Instant,
}

/// A response body that counts what it sends and logs the request when it ends.
pub(super) struct Logged {
    inner: Body,
    bytes: u64,
    entry: Entry,
}

impl Logged {
    pub(super) fn new(inner: Body, entry: Entry) -> Self {
        Self {
            inner,
            bytes: 0,
            entry,
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let e = &self.entry;
        tracing::info!(
            client = %e.client, host = e.host, method = %e.method, path = e.path, version = ?e.version,
            status = e.status, bytes = self.bytes, ms = e.started.elapsed().as_millis() as u64, "request"
        );
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
