//! The admin listener (loopback by default): `/healthz`, `/readyz`, `/metrics`, `GET /tunnels` and
//! `DELETE /tunnels/{host}`. Everything but the probes answers only a request whose Host names
//! this listener (DNS-rebinding defence) and, with a token configured, that carries
//! `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::gateway::Gateway;
use crate::tunnels::Member;

/// Concurrent admin connections: scrapers, probes and an operator's curl need a handful.
pub(crate) const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Serves one admin connection (HTTP/1.1 or h2); on shutdown it finishes the request under way
/// and closes, so a scraper's kept-alive connection never holds up the drain.
pub(crate) async fn serve(gw: Arc<Gateway>, tcp: TcpStream, shutdown: CancellationToken) {
    let local = tcp.local_addr().ok().map(|a| a.ip());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let gw = gw.clone();
        async move { Ok::<_, Infallible>(respond(&gw, &req, local).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "admin connection ended");
    }
}

/// `local`: the address the request arrived on.
async fn respond(gw: &Gateway, req: &Request<Incoming>, local: Option<IpAddr>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        // The probes answer any Host: a load balancer or the kubelet may name the pod's address
        // or anything else, and they tell nothing but "up" and "ready".
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if gw.is_ready() => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ if !host_allowed(crate::http::authority(req), local, gw.config().admin.as_ref()) => {
            tracing::info!(
                path,
                "admin request refused: its Host does not name this listener"
            );
            text(
                StatusCode::MISDIRECTED_REQUEST,
                "Host not allowed: use this listener's IP address or localhost, or list the name \
                 in admin.hosts (DNS-rebinding defence)\n",
            )
        }
        _ if !authorized(gw, req) => {
            let mut r = text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        (&Method::GET, "/metrics") => match gw.metrics() {
            Some(h) => {
                let mut r = text(StatusCode::OK, "");
                *r.body_mut() = Full::new(Bytes::from(h.render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
        },
        (&Method::GET, "/tunnels") => json(StatusCode::OK, &tunnels_json(gw)),
        (&Method::POST, "/acme/renew") => match gw.acme() {
            Some(acme) => {
                tracing::info!("certificate renewal requested through the admin API");
                acme.renew_all();
                json(StatusCode::ACCEPTED, &serde_json::json!({ "renewing": true }))
            }
            None => text(StatusCode::NOT_FOUND, "ACME is not configured\n"),
        },
        (&Method::DELETE, p) if p.starts_with("/tunnels/") => {
            delete_tunnel(gw, &p["/tunnels/".len()..]).await
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/tunnels") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// DNS-rebinding defence: a web page on an attacker's name that resolves to this listener makes a
/// browser on the operator's machine send that name as the Host. Allowed: `localhost`, loopback
/// addresses, the address the request arrived on (`admin.bind`'s, or with an unspecified bind the
/// one the client connected to), and `admin.hosts`; any port.
fn host_allowed(authority: Option<&[u8]>, local: Option<IpAddr>, admin: Option<&AdminConfig>) -> bool {
    let Some(host) = authority.and_then(|a| crate::http::host::parse_host(a).ok()) else {
        return false;
    };
    let listed = admin.map_or(&[][..], |a| a.hosts.as_slice());
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => {
            let ip = ip.to_canonical();
            ip.is_loopback()
                || local.is_some_and(|l| l.to_canonical() == ip)
                || listed.iter().any(|h| h.parse() == Ok(ip))
        }
        Err(_) => host == "localhost" || listed.contains(&host),
    }
}

fn authorized(gw: &Gateway, req: &Request<Incoming>) -> bool {
    let Some(token) = gw.admin_token() else {
        return true;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_bytes(), token.as_bytes()).is_ok()
}

fn tunnels_json(gw: &Gateway) -> serde_json::Value {
    let snapshot = gw.tunnels().snapshot();
    crate::tunnels::tunnels_json(
        &snapshot,
        gw.directory().as_ref(),
        gw.config().public_port,
        |_| true,
    )
}

/// Disconnects every SSH connection serving `host`; their drop deregisters the tunnel.
async fn delete_tunnel(gw: &Gateway, host: &str) -> Response<Full<Bytes>> {
    let host = host.to_ascii_lowercase();
    let doomed: Vec<Arc<Member>> = gw
        .tunnels()
        .snapshot()
        .into_iter()
        .filter(|(k, _)| k.host == host)
        .flat_map(|(_, m)| m)
        .collect();
    for m in &doomed {
        tracing::info!(host, conn = m.conn, "tunnel removed by the admin API");
        crate::ssh::disconnect(&m.handle, "tunnel removed by the operator").await;
    }
    let elsewhere = kill_elsewhere(gw, &host).await;
    if doomed.is_empty() && elsewhere.is_empty() {
        return text(StatusCode::NOT_FOUND, "no such tunnel\n");
    }
    let remote: u64 = elsewhere
        .iter()
        .filter_map(|k| k.result.as_ref().ok())
        .map(|&n| u64::from(n))
        .sum();
    let mut body = serde_json::json!({ "host": host, "disconnected": doomed.len() as u64 + remote });
    if gw.directory().replica_name().is_some() {
        let replicas: Vec<serde_json::Value> = elsewhere
            .iter()
            .map(|k| match &k.result {
                Ok(n) => serde_json::json!({ "replica": k.replica, "disconnected": n }),
                Err(e) => serde_json::json!({ "replica": k.replica, "error": e }),
            })
            .collect();
        body["here"] = doomed.len().into();
        body["replicas"] = replicas.into();
    }
    let failed = elsewhere.iter().any(|k| k.result.is_err());
    let status = if failed {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::OK
    };
    json(status, &body)
}

/// `DELETE /tunnels/{host}` on the other replicas that serve `host` (none without a cluster).
#[cfg(feature = "store")]
async fn kill_elsewhere(gw: &Gateway, host: &str) -> Vec<crate::cluster::Killed> {
    match gw.cluster() {
        Some(cluster) => cluster.kill_elsewhere(host).await,
        None => Vec::new(),
    }
}

/// Without a store backend there are no other replicas.
#[cfg(not(feature = "store"))]
async fn kill_elsewhere(_gw: &Gateway, _host: &str) -> Vec<crate::cluster::Killed> {
    Vec::new()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn allowed(host: &str, local: &str, hosts: &[&str]) -> bool {
        let admin = AdminConfig {
            bind: "0.0.0.0:9090".parse().unwrap(),
            token_file: Some("t".into()),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        host_allowed(Some(host.as_bytes()), Some(local.parse().unwrap()), Some(&admin))
    }

    #[test]
    fn loopback_and_the_listeners_own_address_are_allowed_with_any_port() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:9090",
            "127.8.9.10:1",
            "[::1]:9090",
            "localhost:9090",
        ] {
            assert!(allowed(host, "127.0.0.1", &[]), "{host}");
        }
        assert!(allowed("LocalHost.", "127.0.0.1", &[]));
        assert!(allowed("10.1.2.3:9090", "10.1.2.3", &[]), "the pod's own IP");
        assert!(
            allowed("10.1.2.3:9090", "::ffff:10.1.2.3", &[]),
            "on a dual-stack socket"
        );
    }

    #[test]
    fn other_names_and_addresses_are_refused_unless_listed() {
        for host in [
            "rebind.attacker.example:9090",
            "rebind.attacker.example",
            "localhost.attacker.example",
            "10.9.9.9:9090",
            "",
            "bad host",
        ] {
            assert!(!allowed(host, "10.1.2.3", &[]), "{host:?}");
        }
        assert!(allowed("Admin.Internal:9090", "10.1.2.3", &["admin.internal"]));
        assert!(allowed("10.9.9.9", "10.1.2.3", &["10.9.9.9"]));
        assert!(!host_allowed(None, None, None), "no Host at all");
    }
}
