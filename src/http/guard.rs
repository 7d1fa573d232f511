//! The access rules in front of a tunnel, applied to one request: the gate's rules are awaited
//! (a tunnel is never served before its owner's options are known), `rules::decide` says yes,
//! no or "here is your cookie", and what proves access (basic credentials, the link cookie or
//! bearer) is taken off the request before it goes upstream.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::forward_auth::{self, Verdict};
use super::{text, Body, HttpContext};
use crate::rules::token::COOKIE;
use crate::rules::{decide, Decision, Refusal, Rules, Upstream, Visit, SETTLE_WITHIN};
use crate::tunnels::{Member, Reach};

/// Lets `req` through (after taking the access proofs off it), or answers for the tunnel. The
/// owners' rules are checked for the members here; a pool with none here is refused by the
/// replica holding it when it has rules (`cluster::owner`). The operator's `forward_auth`
/// applies to every pool, wherever its members are.
pub(super) async fn check(
    ctx: &HttpContext,
    req: &mut Request<Incoming>,
    client: IpAddr,
    host: &str,
    members: &[Reach],
) -> Result<(), Response<Body>> {
    let forward = ctx.settings.forward_auth.as_ref();
    let remote_passthrough = |m: &Reach| matches!(m, Reach::Remote(r) if r.upstream == Upstream::Passthrough);
    if members.iter().any(remote_passthrough) {
        return Err(misdirected(host));
    }
    // Nearly every request: no operator check, and every member here settled with no rule.
    if forward.is_none() && members.iter().filter_map(Reach::local).all(|m| m.gate.is_open()) {
        return Ok(());
    }
    // Every local member's connection may have chosen rules: each distinct one must let the
    // request through (one owner, but an old `ssh -N` beside a new `-- private` must not open it).
    let mut locals: Vec<&Member> = Vec::new();
    for m in members.iter().filter_map(Reach::local) {
        if !locals.iter().any(|l| Arc::ptr_eq(&l.gate, &m.gate)) {
            locals.push(m);
        }
    }
    let mut strictest: Vec<(&Member, Arc<Rules>)> = Vec::with_capacity(locals.len());
    for m in locals {
        let Some(rules) = m.gate.ready(SETTLE_WITHIN).await else {
            let why = format!("tunnel {host} is not served: its owner's options were refused\n");
            return Err(text(StatusCode::SERVICE_UNAVAILABLE, why));
        };
        strictest.push((m, rules));
    }
    if strictest.iter().any(|(_, r)| r.upstream == Upstream::Passthrough) {
        return Err(misdirected(host));
    }
    if forward.is_none() && strictest.iter().all(|(_, r)| r.is_open()) {
        return Ok(());
    }
    for (member, rules) in strictest.iter().filter(|(_, r)| !r.is_open()) {
        let decision = {
            let headers = req.headers();
            let cookies = cookies(headers);
            let visit = Visit {
                host,
                client,
                authorization: headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
                cookie: cookies.as_deref().map(str::as_bytes),
                path: req.uri().path(),
                query: req.uri().query(),
                now: Instant::now(),
                unix_now: unix_now(),
            };
            decide(&visit, rules, bucket(member, rules), &ctx.links)
        };
        match decision {
            Decision::Allow => {}
            Decision::Redeem { location, set_cookie } => return Err(redeemed(location, set_cookie)),
            Decision::Deny(refusal) => {
                crate::metrics::access_refused(refusal.reason());
                tracing::info!(%client, host, reason = refusal.reason(), "request refused by the tunnel's access rules");
                return Err(refused(host, &refusal));
            }
        }
    }
    // The owners' proofs are theirs: neither the operator's auth service nor the app sees them.
    for (_, rules) in &strictest {
        take_proofs(req, rules, |token| {
            ctx.links.check(host, token, unix_now()).is_ok()
        });
    }
    // The operator's check comes last, on a request the owners' rules let through.
    if let Some(cfg) = forward {
        if let Verdict::Answer(answer) = forward_auth::ask(cfg, req, client, host).await {
            return Err(answer);
        }
    }
    Ok(())
}

/// HTTP for a passthrough host, reached with another SNI (or none): this host's TLS is its
/// owner's, not the gateway's.
fn misdirected(host: &str) -> Response<Body> {
    let why = format!("tunnel {host} is served by TLS passthrough: connect with TLS and SNI {host}\n");
    text(StatusCode::MISDIRECTED_REQUEST, why)
}

fn redeemed(location: String, set_cookie: String) -> Response<Body> {
    let mut r = text(StatusCode::SEE_OTHER, "signed in: redirecting\n".into());
    let h = r.headers_mut();
    for (name, value) in [
        (header::LOCATION, location),
        (header::SET_COOKIE, set_cookie),
        (header::CACHE_CONTROL, "no-store".to_owned()),
    ] {
        if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
            h.insert(name, v);
        }
    }
    r
}

fn bucket<'m>(member: &'m Member, rules: &Rules) -> Option<&'m crate::rules::Bucket> {
    member
        .bucket
        .get_or_init(|| rules.rate.map(|r| crate::rules::Bucket::new(r, Instant::now())))
        .as_ref()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every `Cookie` header as one (h2 clients send one header per cookie).
fn cookies(headers: &hyper::HeaderMap) -> Option<String> {
    let all: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!all.is_empty()).then(|| all.join("; "))
}

/// Basic credentials and the link (cookie or bearer) are for the gateway, not the backend; a
/// bearer that is not this tunnel's link is the app's own and stays.
fn take_proofs(req: &mut Request<Incoming>, rules: &Rules, is_link: impl Fn(&str) -> bool) {
    let headers = req.headers_mut();
    if rules.auth.is_some() {
        headers.remove(header::AUTHORIZATION);
    }
    if !rules.private {
        return;
    }
    let link = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim())
        })
        .is_some_and(&is_link);
    if link {
        headers.remove(header::AUTHORIZATION);
    }
    if let Some(all) = cookies(headers) {
        let kept: Vec<&str> = all
            .split(';')
            .map(str::trim)
            .filter(|c| !c.is_empty() && c.split_once('=').is_none_or(|(n, _)| n != COOKIE))
            .collect();
        headers.remove(header::COOKIE);
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            if !kept.is_empty() {
                headers.insert(header::COOKIE, v);
            }
        }
    }
}

fn refused(host: &str, refusal: &Refusal) -> Response<Body> {
    match refusal {
        Refusal::Address => text(
            StatusCode::FORBIDDEN,
            "your address may not reach this tunnel\n".into(),
        ),
        Refusal::Rate { retry_after } => {
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests to this tunnel; retry later\n".into(),
            );
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            r
        }
        Refusal::Private { why } => text(
            StatusCode::UNAUTHORIZED,
            format!(
                "this tunnel is private ({why}): open the link its owner made with `ssh GATEWAY link NAME`\n"
            ),
        ),
        Refusal::Auth => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "this tunnel needs a user and password\n".into(),
            );
            let realm = format!("Basic realm=\"{host}\", charset=\"UTF-8\"");
            if let Ok(v) = HeaderValue::from_str(&realm) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            r
        }
    }
}
