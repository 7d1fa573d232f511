//! WebSocket over HTTP/2 (RFC 8441): an extended CONNECT with `:protocol websocket` becomes the
//! HTTP/1.1 Upgrade a tunnel's app expects (RFC 6455), and the app's 101 becomes the 200 the h2
//! client expects. The two upgraded streams are then spliced like an HTTP/1.1 WebSocket's.

use data_encoding::BASE64;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};

use super::Body;

/// What an RFC 6455 handshake answer may carry on to an RFC 8441 client.
const KEPT: [HeaderName; 2] = [header::SEC_WEBSOCKET_PROTOCOL, header::SEC_WEBSOCKET_EXTENSIONS];

/// An h2 extended CONNECT asking for a WebSocket.
pub(super) fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_2
        && req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Turns the (already origin-form, HTTP/1.1) request into an RFC 6455 opening handshake: GET,
/// `Upgrade: websocket`, a fresh `Sec-WebSocket-Key` (RFC 8441 clients send none); the
/// version, subprotocols and extensions the client asked for travel on.
pub(super) fn to_upgrade<B>(req: &mut Request<B>) {
    *req.method_mut() = Method::GET;
    req.extensions_mut().remove::<Protocol>();
    let key = BASE64.encode(&rand::random::<[u8; 16]>());
    let h = req.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(key) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    if !h.contains_key(header::SEC_WEBSOCKET_VERSION) {
        h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
}

/// The app's `101 Switching Protocols` as the 200 an RFC 8441 client waits for.
pub(super) fn accepted(upstream: &Response<Incoming>) -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *r.status_mut() = StatusCode::OK;
    for name in KEPT {
        for value in upstream.headers().get_all(&name) {
            r.headers_mut().append(name.clone(), value.clone());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_extended_connect_becomes_an_rfc_6455_handshake() {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("/chat")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat")
            .extension(Protocol::from_static("websocket"))
            .body(())
            .unwrap();
        assert!(is_extended_connect(&req));
        to_upgrade(&mut req);
        assert_eq!(req.method(), Method::GET);
        let h = req.headers();
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(
            BASE64
                .decode(h[header::SEC_WEBSOCKET_KEY].as_bytes())
                .unwrap()
                .len(),
            16
        );
        assert_eq!(h[header::SEC_WEBSOCKET_PROTOCOL], "chat");
        assert!(!is_extended_connect(&req));
        let plain = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .extension(Protocol::from_static("something-else"))
            .body(())
            .unwrap();
        assert!(!is_extended_connect(&plain));
    }
}
