//! What the proxy knows of gRPC: a request's deadline (`grpc-timeout`), which bounds the wait
//! for the app's answer like `limits.upstream_timeout` does, and the answer a gRPC client
//! understands when that wait runs out (DEADLINE_EXCEEDED as a trailers-only response).

use std::time::Duration;

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use super::Body;

/// `grpc-status` for DEADLINE_EXCEEDED.
const DEADLINE_EXCEEDED: &str = "4";

/// Whether the request is gRPC (`content-type: application/grpc`, `+proto` and the like).
pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`,
/// `n`), as the gRPC over HTTP/2 protocol defines it. Anything else is `None` (no deadline).
pub(crate) fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's deadline, if it is gRPC and sends one.
pub(super) fn deadline(headers: &HeaderMap) -> Option<Duration> {
    if !is_grpc(headers) {
        return None;
    }
    parse_timeout(headers.get("grpc-timeout")?.as_bytes())
}

/// DEADLINE_EXCEEDED, as a gRPC server would say it: status 200, no body, the status in the
/// headers (a trailers-only response).
pub(super) fn deadline_exceeded(waited: Duration) -> Response<Body> {
    let mut r = super::text(StatusCode::OK, String::new());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from_static(DEADLINE_EXCEEDED));
    let message = format!("edgemux: the tunnel did not answer within the deadline ({waited:?})");
    if let Ok(v) = HeaderValue::from_str(&message) {
        h.insert("grpc-message", v);
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn timeouts_parse_in_every_unit_and_nothing_else_does() {
        let table: &[(&[u8], Option<Duration>)] = &[
            (b"1H", Some(Duration::from_secs(3600))),
            (b"2M", Some(Duration::from_secs(120))),
            (b"30S", Some(Duration::from_secs(30))),
            (b"500m", Some(Duration::from_millis(500))),
            (b"99999999u", Some(Duration::from_micros(99_999_999))),
            (b"7n", Some(Duration::from_nanos(7))),
            (b"99999999H", Some(Duration::from_secs(99_999_999 * 3600))),
            (b"100000000m", None),
            (b"m", None),
            (b"", None),
            (b"5", None),
            (b"5s", None),
            (b"-5S", None),
            (b"+5S", None),
            (b" 5S", None),
            (b"\xff5S", None),
        ];
        for (value, want) in table {
            assert_eq!(
                parse_timeout(value),
                *want,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        let full = b"12345678m";
        for n in 0..=full.len() {
            let _ = parse_timeout(&full[..n]);
        }
    }

    #[test]
    fn only_grpc_requests_have_a_deadline() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("1S"));
        assert_eq!(deadline(&h), None, "not gRPC");
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert_eq!(deadline(&h), Some(Duration::from_secs(1)));
        let r = deadline_exceeded(Duration::from_secs(1));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
    }
}
