//! The HTTP side (placeholder until the reverse proxy lands): plain HTTP is redirected to https,
//! HTTPS answers 404 for now.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::Config;
use crate::conn::{BoxStream, ClientAddr};
use crate::ssh::SshContext;
use crate::tunnels::Tunnels;

#[derive(Debug)]
pub struct HttpContext {
    domain: String,
    public_port: u16,
    #[allow(dead_code)]
    tunnels: Arc<Tunnels>,
    #[allow(dead_code)]
    ssh: Arc<SshContext>,
}

impl HttpContext {
    pub fn new(config: &Config, tunnels: Arc<Tunnels>, ssh: Arc<SshContext>) -> Self {
        Self {
            domain: config.domain.clone(),
            public_port: config.public_port,
            tunnels,
            ssh,
        }
    }
}

pub async fn serve(ctx: Arc<HttpContext>, stream: BoxStream, _addr: ClientAddr, tls: bool) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(respond(&ctx, &req, tls)) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "http connection ended");
    }
}

fn respond(ctx: &HttpContext, req: &Request<Incoming>, tls: bool) -> Response<Full<Bytes>> {
    let host = req
        .uri()
        .host()
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or(&ctx.domain)
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string();
    if !tls {
        let port = match ctx.public_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let location = format!("https://{host}{port}{path}");
        return Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(hyper::header::LOCATION, location)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(format!("no tunnel for {host}\n"))))
        .unwrap_or_default()
}
