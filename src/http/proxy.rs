//! One proxied request: the visitor's request rewritten for the app (HTTP/1.1, or HTTP/2 on an
//! `upstream=h2c` tunnel), sent on a kept-alive or new upstream connection, and the answer
//! handed back; WebSocket upgrades spliced both ways.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use super::{authority, text, Hop};
use super::{forward, grpc, h2c, upstream, websocket, Body, HttpContext, ProxyError};
use crate::io::{ClientAddr, ClientKey};
use crate::rules::Upstream;
use crate::tunnels::{Reach, Visitor};

pub(super) async fn proxy(
    ctx: &HttpContext,
    mut req: Request<Incoming>,
    caller: &ClientAddr,
    members: &[Reach],
    host: &str,
) -> Result<Response<Body>, ProxyError> {
    let client = caller.client;
    // A WebSocket: an HTTP/1.1 Upgrade, or an h2 extended CONNECT (RFC 8441).
    let ws_h2 = websocket::is_extended_connect(&req);
    let upgrade = ws_h2 || (req.version() == Version::HTTP_11 && forward::is_upgrade(req.headers()));
    if members.iter().any(speaks_h2c) {
        if upgrade && !ws_h2 {
            let why = format!(
                "tunnel {host} speaks HTTP/2 to its app (upstream=h2c): a WebSocket reaches it over \
                 HTTP/2 (RFC 8441), not as an HTTP/1.1 Upgrade\n"
            );
            return Ok(text(StatusCode::NOT_IMPLEMENTED, why));
        }
        let h2c: Vec<Reach> = members.iter().filter(|m| speaks_h2c(m)).cloned().collect();
        return proxy_h2c(ctx, req, caller, &h2c, (host, ws_h2)).await;
    }
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    rewrite_for_app(ctx, &mut req, client.ip(), host, upgrade);
    if ws_h2 {
        websocket::to_upgrade(&mut req);
    }

    let limits = ctx.limits.load_full();
    let reach = (ctx.directory.as_ref(), ctx.idle.as_ref());
    let bounds = (limits.tunnel_open_timeout, limits.channels_per_tunnel);
    let visitor = (client, caller.vpce.as_deref());
    let (mut conn, member) = upstream::connect(reach, members, visitor, bounds, upgrade).await?;
    crate::metrics::upstream_request(Upstream::Http1.label());
    let hop = Hop(if member.local().is_some() { "local" } else { "peer" });
    if let Some(m) = member.local() {
        m.stats
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let mut resp = match tokio::time::timeout(limits.upstream_timeout, conn.sender.send_request(req)).await {
        Err(_) => return Err(ProxyError::Timeout(limits.upstream_timeout)),
        Ok(Err(e)) => return Err(ProxyError::Upstream(e)),
        Ok(Ok(r)) => r,
    };
    resp.extensions_mut().insert(hop);
    if let (StatusCode::SWITCHING_PROTOCOLS, Some(downstream)) = (resp.status(), downstream_upgrade) {
        let upstream = hyper::upgrade::on(&mut resp);
        // On h2, hyper runs the upgraded stream as a task of the connection's executor, so an
        // open WebSocket counts as a live stream and the connection never looks idle.
        tokio::spawn(splice_upgrade(downstream, upstream));
        if ws_h2 {
            return Ok(websocket::accepted(&resp));
        }
        return Ok(resp.map(|b| b.boxed()));
    }
    if !upgrade {
        upstream::release(ctx.idle.clone(), member, conn, limits.channels_per_tunnel);
    }
    forward::strip_hop_by_hop(resp.headers_mut(), false);
    Ok(resp.map(|b| b.boxed()))
}

/// The rewrite every proxied request gets ([`prepare_upstream_request`]) with what the gateway
/// knows of its origin; returns the Host shown to the app.
fn rewrite_for_app(
    ctx: &HttpContext,
    req: &mut Request<Incoming>,
    client: std::net::IpAddr,
    host: &str,
    upgrade: bool,
) -> HeaderValue {
    let shown_host = authority(req)
        .and_then(|a| HeaderValue::from_bytes(a).ok())
        .unwrap_or_else(|| HeaderValue::from_static(""));
    let origin = forward::Origin {
        client,
        host,
        port: ctx.public_port,
    };
    let trusted = ctx.settings.trusts(client);
    prepare_upstream_request(req, shown_host.clone(), (&origin, trusted), upgrade);
    shown_host
}

/// A member whose owner asked for `upstream=h2c`: here, by its options; on another replica, as
/// that replica published it.
fn speaks_h2c(m: &Reach) -> bool {
    match m {
        Reach::Local(m) => m.gate.upstream() == Some(Upstream::H2c),
        Reach::Remote(r) => r.upstream == Upstream::H2c,
    }
}

/// The request on one stream of a member's shared HTTP/2 connection: requests, responses and
/// trailers pass as they are, flow-controlled per stream. A gRPC deadline shorter than
/// `limits.upstream_timeout` bounds the wait for the answer instead. A WebSocket over h2
/// (`ws_h2`, an extended CONNECT) stays one: the app must accept RFC 8441 itself.
async fn proxy_h2c(
    ctx: &HttpContext,
    mut req: Request<Incoming>,
    caller: &ClientAddr,
    members: &[Reach],
    (host, ws_h2): (&str, bool),
) -> Result<Response<Body>, ProxyError> {
    let client = caller.client;
    let limits = ctx.limits.load_full();
    // A gRPC deadline counts from the request's arrival, the channel's opening included.
    let deadline = grpc::deadline(req.headers()).filter(|d| *d < limits.upstream_timeout);
    let give_up = deadline.map(|d| tokio::time::Instant::now() + d);
    let downstream_upgrade = ws_h2.then(|| hyper::upgrade::on(&mut req));
    // The one TE value HTTP/2 allows, and gRPC servers require.
    let trailers = req
        .headers()
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let shown_host = rewrite_for_app(ctx, &mut req, client.ip(), host, false);
    to_h2(&mut req, &shown_host, trailers);

    let ip = client.ip().to_canonical().to_string();
    let visitor = Visitor {
        origin: (ip.as_str(), u32::from(client.port())),
        client: ClientKey::of(client.ip()),
        vpce: caller.vpce.as_deref(),
        key: None,
    };
    let reach = (ctx.directory.as_ref(), ctx.h2c.as_ref());
    let connecting = h2c::connect(reach, members, visitor, limits.tunnel_open_timeout);
    let connected = match give_up {
        Some(at) => tokio::time::timeout_at(at, connecting).await.ok(),
        None => Some(connecting.await),
    };
    let (stream, member) = match connected {
        None => return Err(ProxyError::Deadline(deadline.unwrap_or_default())),
        Some(None) => return Err(ProxyError::Unavailable(upstream::UpstreamError::Unavailable)),
        Some(Some(found)) => found,
    };
    if let Some(m) = member.local() {
        m.stats
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    crate::metrics::upstream_request(Upstream::H2c.label());
    let mut sender = stream
        .sender()
        .ok_or(ProxyError::Unavailable(upstream::UpstreamError::Unavailable))?;
    let wait = tokio::time::Instant::now() + limits.upstream_timeout;
    let until = give_up.map_or(wait, |at| at.min(wait));
    let mut resp = match tokio::time::timeout_at(until, sender.send_request(req)).await {
        Err(_) => match deadline {
            Some(d) => return Err(ProxyError::Deadline(d)),
            None => return Err(ProxyError::Timeout(limits.upstream_timeout)),
        },
        Ok(Err(e)) => return Err(ProxyError::Upstream(e)),
        Ok(Ok(r)) => r,
    };
    let hop = Hop(if member.local().is_some() { "local" } else { "peer" });
    resp.extensions_mut().insert(hop);
    if let (StatusCode::OK, Some(downstream)) = (resp.status(), downstream_upgrade) {
        let upstream = hyper::upgrade::on(&mut resp);
        let accepted = websocket::accepted(&resp);
        tokio::spawn(async move {
            splice_upgrade(downstream, upstream).await;
            drop(stream);
        });
        return Ok(accepted);
    }
    forward::strip_hop_by_hop(resp.headers_mut(), false);
    // The stream's place on the shared connection is given back when the body is dropped.
    Ok(resp.map(move |body| {
        body.map_frame(move |frame| {
            let _place = &stream;
            frame
        })
        .boxed()
    }))
}

/// The HTTP/1.1-shaped request as HTTP/2: `:scheme` and `:authority` instead of `Host`, and
/// `TE: trailers` kept when the visitor sent it.
fn to_h2<B>(req: &mut Request<B>, authority: &HeaderValue, trailers: bool) {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_bytes())
        .path_and_query(path)
        .build();
    if let Ok(uri) = uri {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    let headers = req.headers_mut();
    headers.remove(header::HOST);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// [`prepare_upstream_request`] for `benches/forward.rs`: the rewrite every proxied request gets,
/// from an untrusted visitor or a `trusted` forwarder.
#[doc(hidden)]
pub fn bench_prepare<B>(req: &mut Request<B>, client: std::net::IpAddr, host: &str, trusted: bool) {
    let shown = HeaderValue::from_str(host).unwrap_or_else(|_| HeaderValue::from_static("x"));
    let origin = forward::Origin {
        client,
        host,
        port: 443,
    };
    prepare_upstream_request(req, shown, (&origin, trusted), false);
}

/// Turns the visitor's request into the HTTP/1.1 request the tunnel client's app expects.
fn prepare_upstream_request<B>(
    req: &mut Request<B>,
    shown_host: HeaderValue,
    (origin, trusted): (&forward::Origin<'_>, bool),
    upgrade: bool,
) {
    // Origin form: the path and query alone (a cheap clone of what was parsed).
    let mut parts = hyper::http::uri::Parts::default();
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
    );
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    forward::strip_hop_by_hop(headers, upgrade);
    headers.insert(header::HOST, shown_host);
    forward::set_forwarding(headers, origin, trusted);
}

/// Copies bytes both ways between an upgraded visitor and an upgraded upstream (WebSocket).
/// No idle timeout: it lasts as long as either side keeps it open.
async fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = tokio::join!(downstream, upstream) else {
        tracing::debug!("upgrade did not complete");
        return;
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}
