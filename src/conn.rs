//! The one place that knows the order of a connection's stages:
//! sniff → TLS → route → SSH or HTTP, everything before routing under one deadline.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::config::ListenerConfig;
use crate::gateway::Gateway;
use crate::prefixed::Prefixed;
use crate::route::{self, Dest, NoRoute};
use crate::sniff::{self, Protocol, SniffError, Sniffed};
use crate::tls::TlsError;

/// A routed stream, whatever stages it went through.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

/// Who is on the other end: the TCP peer, and the real client (which the PROXY stage may set).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr {
    pub peer: SocketAddr,
    pub client: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("sniff: {0}")]
    Sniff(#[from] SniffError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("no route: {0:?}")]
    NoRoute(NoRoute),
    #[error("nothing routed within the pre-routing deadline")]
    Deadline,
}

impl ConnError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Sniff(e) => e.reason(),
            Self::Tls(e) => e.reason(),
            Self::NoRoute(NoRoute::Closed) => "closed",
            Self::NoRoute(NoRoute::Unexpected(_)) => "unexpected_protocol",
            Self::NoRoute(NoRoute::PlainSshDisabled) => "plain_ssh_disabled",
            Self::Deadline => "deadline",
        }
    }
}

/// A connection that reached a service.
struct Routed {
    dest: Dest,
    stream: BoxStream,
    tls: bool,
}

/// Handles one accepted connection to the end. Never panics on peer input; errors end up in one
/// outcome log line.
pub async fn handle(
    gw: Arc<Gateway>,
    listener: Arc<ListenerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!(
        "conn",
        %peer,
        listener = %listener.bind,
        client = field::Empty,
        sni = field::Empty,
        alpn = field::Empty,
        route = field::Empty,
    );
    async move {
        let _ = tcp.set_nodelay(true);
        let addr = ClientAddr { peer, client: peer };
        tracing::Span::current().record("client", field::display(addr.client));
        let deadline = gw.limits().pre_routing_timeout;
        let routed =
            match tokio::time::timeout(deadline, route_connection(&gw, &listener, tcp)).await {
                Ok(r) => r,
                Err(_) => Err(ConnError::Deadline),
            };
        match routed {
            Ok(r) => serve(&gw, r, addr, shutdown).await,
            Err(ConnError::NoRoute(NoRoute::Closed)) => {
                tracing::debug!("closed before sending anything")
            }
            Err(e) => tracing::info!(reason = e.reason(), error = %e, "connection refused"),
        }
    }
    .instrument(span)
    .await
}

async fn serve(gw: &Gateway, r: Routed, addr: ClientAddr, shutdown: CancellationToken) {
    tracing::Span::current().record("route", r.dest.as_str());
    match r.dest {
        Dest::Ssh => match crate::ssh::serve(gw.ssh(), r.stream, addr.client).await {
            Ok(()) => tracing::info!("ssh connection closed"),
            Err(e) if e.is_disconnect() => tracing::info!("ssh connection closed by the client"),
            Err(e) => tracing::info!(error = %e, "ssh connection ended"),
        },
        Dest::Http => crate::http::serve(gw.http(), r.stream, addr, r.tls, shutdown).await,
    }
}

async fn route_connection(
    gw: &Gateway,
    listener: &ListenerConfig,
    mut tcp: TcpStream,
) -> Result<Routed, ConnError> {
    let (sniffed, buf) = sniff::read_protocol(&mut tcp, gw.limits().sniff_timeout).await;
    let sniffed = sniffed?;
    let stream = Prefixed::new(buf, tcp);
    if sniffed == Sniffed::Found(Protocol::Tls) {
        return route_tls(gw, stream).await;
    }
    if sniffed == Sniffed::Found(Protocol::ProxyHeader) {
        tracing::warn!(
            "received a PROXY protocol header on a listener with proxy_protocol = \"off\": enable \
             proxy_protocol on this listener and add the load balancer to trusted_proxies"
        );
    }
    let dest = route::by_sniff(&sniffed, listener.plain_ssh).map_err(ConnError::NoRoute)?;
    Ok(Routed {
        dest,
        stream: Box::new(stream),
        tls: false,
    })
}

async fn route_tls(gw: &Gateway, stream: Prefixed<TcpStream>) -> Result<Routed, ConnError> {
    let (mut tls, negotiated) = crate::tls::accept(stream, gw.tls_config()).await?;
    let span = tracing::Span::current();
    if let Some(sni) = &negotiated.sni {
        span.record("sni", sni.as_str());
    }
    if let Some(alpn) = &negotiated.alpn {
        span.record("alpn", String::from_utf8_lossy(alpn).as_ref());
    }
    if let Some(dest) = route::by_alpn(negotiated.alpn.as_deref()) {
        return Ok(Routed {
            dest,
            stream: Box::new(tls),
            tls: true,
        });
    }
    let (sniffed, buf) = sniff::read_protocol(&mut tls, gw.limits().sniff_timeout).await;
    // Inside TLS, SSH is always allowed: the TLS layer already authenticated the gateway.
    let dest = route::by_sniff(&sniffed?, true).map_err(ConnError::NoRoute)?;
    Ok(Routed {
        dest,
        stream: Box::new(Prefixed::new(buf, tls)),
        tls: true,
    })
}
