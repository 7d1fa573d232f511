//! The operator's `forward_auth`: each request to a tunnel is first shown to an auth service, the
//! convention of Traefik's ForwardAuth, Caddy's `forward_auth` and nginx's `auth_request`, so
//! oauth2-proxy and Authelia work unchanged. 2xx lets the request through with the configured
//! response headers copied onto it; any other answer goes back to the visitor as it is (a 302 to
//! the login page); no answer in time is a 503, never a pass.

use std::net::IpAddr;

use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{text, Body};
use crate::config::ForwardAuthConfig;

/// Largest answer body passed back to the visitor (a login page or a redirect's note).
const MAX_ANSWER: usize = 64 * 1024;

/// What the auth service said.
pub(super) enum Verdict {
    /// Let the request through (the copied headers are already on it).
    Pass,
    /// Answer the visitor with this.
    Answer(Response<Body>),
}

/// Asks the auth service about `req` (from `client`, for tunnel `host`).
pub(super) async fn ask(
    cfg: &ForwardAuthConfig,
    req: &mut Request<Incoming>,
    client: IpAddr,
    host: &str,
) -> Verdict {
    // A visitor never brings these itself: only the auth service's answer sets them.
    for name in &cfg.response_headers {
        req.headers_mut().remove(name);
    }
    let asked = tokio::time::timeout(cfg.timeout, call(cfg, req, client, host)).await;
    let answer = match asked {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return unavailable(host, &e),
        Err(_) => return unavailable(host, &format!("no answer within {:?}", cfg.timeout)),
    };
    if answer.status().is_success() {
        for name in &cfg.response_headers {
            for value in answer.headers().get_all(name) {
                req.headers_mut().append(name.clone(), value.clone());
            }
        }
        return Verdict::Pass;
    }
    crate::metrics::access_refused("forward_auth");
    tracing::info!(%client, host, status = answer.status().as_u16(), "request refused by forward_auth");
    let (mut parts, body) = answer.into_parts();
    let collected = tokio::time::timeout(cfg.timeout, Limited::new(body, MAX_ANSWER).collect()).await;
    let body = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        _ => return unavailable(host, "answer body too large, cut or late"),
    };
    for name in super::forward::hop_by_hop() {
        parts.headers.remove(name);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = Full::new(body).map_err(|never| match never {}).boxed();
    Verdict::Answer(Response::from_parts(parts, body))
}

fn unavailable(host: &str, why: &str) -> Verdict {
    tracing::warn!(host, error = why, "forward_auth failed; refusing the request");
    Verdict::Answer(text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the authentication service did not answer; try again later\n".into(),
    ))
}

/// One request to the auth service over a fresh connection: the visitor's method, URI and
/// client as `X-Forwarded-*`, its headers (cookies, credentials) as they came.
async fn call(
    cfg: &ForwardAuthConfig,
    req: &Request<Incoming>,
    client: IpAddr,
    host: &str,
) -> Result<Response<Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(&cfg.address)
        .await
        .map_err(|e| format!("connect {}: {e}", cfg.address))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut ask = Request::get(cfg.path_and_query.clone())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let headers = ask.headers_mut();
    for (name, value) in req.headers() {
        if name != header::HOST && name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            headers.append(name.clone(), value.clone());
        }
    }
    // What the auth service is told about the request comes from the gateway alone: the
    // visitor's own forwarding headers and address claims never reach it.
    let claims = super::forward::forwarding()
        .into_iter()
        .chain(super::forward::client_claims());
    for name in super::forward::hop_by_hop().into_iter().chain(claims) {
        headers.remove(name);
    }
    for name in ["x-forwarded-method", "x-forwarded-uri"] {
        headers.remove(name);
    }
    let uri = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let client = client.to_canonical().to_string();
    let set = [
        (header::HOST, cfg.authority.as_str()),
        (
            HeaderName::from_static("x-forwarded-method"),
            req.method().as_str(),
        ),
        (HeaderName::from_static("x-forwarded-proto"), "https"),
        (HeaderName::from_static("x-forwarded-host"), host),
        (HeaderName::from_static("x-forwarded-uri"), uri),
        (HeaderName::from_static("x-forwarded-for"), client.as_str()),
    ];
    for (name, value) in set {
        // Bytes, not text: a URI may hold UTF-8, and a header left unset could be spoofed.
        let v = HeaderValue::from_bytes(value.as_bytes()).map_err(|_| format!("cannot pass {name} on"))?;
        headers.insert(name, v);
    }
    sender.send_request(ask).await.map_err(|e| e.to_string())
}
