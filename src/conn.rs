//! The one place that knows the order of a connection's stages:
//! sniff → TLS → route → SSH or HTTP, everything before routing under one deadline.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::config::{ListenerConfig, ProxyMode};
use crate::counted::Counted;
use crate::gateway::{ClientSlot, Gateway};
use crate::metrics;
use crate::prefixed::Prefixed;
use crate::proxy_protocol::{self, HeaderRead, ProxyError, ProxyHeader};
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
    #[error("{0}")]
    Proxy(#[from] ProxyError),
    #[error("nothing routed within the pre-routing deadline")]
    Deadline,
    #[error("TLS handshake took longer than limits.tls_handshake_timeout")]
    TlsTimeout,
    #[error("{0} already has limits.max_connections_per_client connections")]
    PerClientLimit(std::net::IpAddr),
}

impl ConnError {
    /// The pipeline stage that refused the connection (a bounded metric label).
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Sniff(_) => "sniff",
            Self::Tls(_) => "tls",
            Self::NoRoute(_) => "route",
            Self::Proxy(_) => "proxy",
            Self::Deadline => "deadline",
            Self::TlsTimeout => "tls",
            Self::PerClientLimit(_) => "limits",
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Sniff(e) => e.reason(),
            Self::Tls(e) => e.reason(),
            Self::NoRoute(NoRoute::Closed) => "closed",
            Self::NoRoute(NoRoute::Unexpected(_)) => "unexpected_protocol",
            Self::NoRoute(NoRoute::PlainSshDisabled) => "plain_ssh_disabled",
            Self::Proxy(e) => e.reason(),
            Self::Deadline => "deadline",
            Self::TlsTimeout => "timeout",
            Self::PerClientLimit(_) => "per_client",
        }
    }
}

/// A connection that reached a service.
struct Routed {
    dest: Dest,
    stream: BoxStream,
    tls: bool,
    /// The ALPN protocol TLS settled on, if any.
    alpn: Option<Vec<u8>>,
    /// The AWS VPC endpoint the client came through (PROXY v2 TLV), shown by the admin API.
    vpce: Option<String>,
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
        vpce = field::Empty,
    );
    async move {
        let _ = tcp.set_nodelay(true);
        let label = listener.bind.to_string();
        metrics::accepted(&label);
        let pending = metrics::ActiveGuard::new("pending");
        let deadline = gw.limits().pre_routing_timeout;
        let routing = route_connection(&gw, &listener, tcp, peer);
        let routed = tokio::time::timeout(deadline, routing).await;
        drop(pending);
        match routed.unwrap_or(Err(ConnError::Deadline)) {
            Ok((r, addr, _slot)) => {
                metrics::routed(&label, r.dest.as_str());
                serve(&gw, r, addr, shutdown).await
            }
            Err(ConnError::NoRoute(NoRoute::Closed)) => {
                metrics::rejected("route", "closed");
                tracing::debug!("closed before sending anything")
            }
            Err(e) => {
                metrics::rejected(e.stage(), e.reason());
                tracing::info!(stage = e.stage(), reason = e.reason(), error = %e, "connection refused")
            }
        }
    }
    .instrument(span)
    .await
}

/// Runs the routed service and writes the connection's outcome line.
async fn serve(gw: &Gateway, r: Routed, addr: ClientAddr, shutdown: CancellationToken) {
    let route = r.dest.as_str();
    tracing::Span::current().record("route", route);
    let _active = metrics::ActiveGuard::new(route);
    let started = std::time::Instant::now();
    let (stream, totals) = Counted::new(r.stream, route);
    let stream: BoxStream = Box::new(stream);
    let outcome = match r.dest {
        Dest::Ssh => match crate::ssh::serve(gw.ssh(), stream, (addr.client, r.vpce), shutdown).await {
            Ok(()) => "closed".to_string(),
            Err(e) if e.is_disconnect() => "closed by the client".to_string(),
            Err(e) => e.to_string(),
        },
        Dest::Http => {
            let wire = crate::http::Wire::from_alpn(r.alpn.as_deref());
            crate::http::serve(gw.http(), stream, addr, (r.tls, wire), shutdown).await;
            "closed".to_string()
        }
    };
    tracing::info!(
        outcome,
        secs = started.elapsed().as_secs_f64(),
        bytes_in = totals.inbound.load(Ordering::Relaxed),
        bytes_out = totals.outbound.load(Ordering::Relaxed),
        "connection ended"
    );
}

/// The PROXY stage: a header is read only from trusted peers on listeners that expect one.
async fn read_proxy(
    gw: &Gateway,
    listener: &ListenerConfig,
    mut tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(Prefixed<TcpStream>, ClientAddr, Option<ProxyHeader>), ConnError> {
    let mut addr = ClientAddr { peer, client: peer };
    if listener.proxy_protocol == ProxyMode::Off || !listener.trusts(peer.ip()) {
        return Ok((Prefixed::new(Vec::new(), tcp), addr, None));
    }
    let (read, rest) = proxy_protocol::read_header(&mut tcp, gw.limits().sniff_timeout).await;
    let read = read.inspect_err(|e| metrics::proxy_header("unknown", e.reason()))?;
    match read {
        HeaderRead::Header(h) => {
            metrics::proxy_header(if h.version == 1 { "v1" } else { "v2" }, "ok");
            addr.client = h.source.unwrap_or(peer);
            if let Some(vpce) = &h.vpce_id {
                tracing::Span::current().record("vpce", vpce.as_str());
            }
            tracing::debug!(version = h.version, local = h.source.is_none(), "PROXY header");
            Ok((Prefixed::new(rest, tcp), addr, Some(h)))
        }
        HeaderRead::Closed => Err(ConnError::NoRoute(NoRoute::Closed)),
        HeaderRead::NoHeader if listener.proxy_protocol == ProxyMode::Required => {
            metrics::proxy_header("none", "missing");
            Err(ProxyError::Missing(peer.ip()).into())
        }
        HeaderRead::NoHeader => Ok((Prefixed::new(rest, tcp), addr, None)),
    }
}

async fn route_connection<'g>(
    gw: &'g Gateway,
    listener: &ListenerConfig,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(Routed, ClientAddr, ClientSlot<'g>), ConnError> {
    let (mut stream, addr, header) = read_proxy(gw, listener, tcp, peer).await?;
    let vpce = header.as_ref().and_then(|h| h.vpce_id.clone());
    tracing::Span::current().record("client", field::display(addr.client));
    let limits = gw.limits();
    let slot = gw
        .clients()
        .acquire(addr.client.ip(), limits.max_connections_per_client)
        .ok_or(ConnError::PerClientLimit(addr.client.ip()))?;
    // The sniff timer starts after the header: an NLB sends it with the client's first bytes.
    let (sniffed, buf) = sniff::read_protocol(&mut stream, gw.limits().sniff_timeout).await;
    let sniffed = sniffed?;
    let stream = Prefixed::new(buf, stream);
    if sniffed == Sniffed::Found(Protocol::Tls) {
        let tls = tokio::time::timeout(limits.tls_handshake_timeout, route_tls(gw, stream)).await;
        let mut routed = tls.map_err(|_| ConnError::TlsTimeout)??;
        routed.vpce = vpce;
        return Ok((routed, addr, slot));
    }
    if sniffed == Sniffed::Found(Protocol::ProxyHeader) {
        return Err(misplaced_proxy_header(listener, peer, header.is_some()));
    }
    let dest = route::by_sniff(&sniffed, listener.plain_ssh).map_err(ConnError::NoRoute)?;
    let routed = Routed {
        dest,
        stream: Box::new(stream),
        tls: false,
        alpn: None,
        vpce,
    };
    Ok((routed, addr, slot))
}

/// A PROXY header where none may be: explain the fix when the listener is not configured for it.
fn misplaced_proxy_header(listener: &ListenerConfig, peer: SocketAddr, had_header: bool) -> ConnError {
    if had_header {
        return ProxyError::Invalid("a second PROXY header").into();
    }
    if listener.proxy_protocol == ProxyMode::Off {
        tracing::warn!(
            "received a PROXY protocol header on a listener with proxy_protocol = \"off\": enable \
             proxy_protocol on this listener and add the load balancer to trusted_proxies"
        );
        return ConnError::NoRoute(NoRoute::Unexpected(Protocol::ProxyHeader));
    }
    metrics::proxy_header("unknown", "untrusted");
    ProxyError::Untrusted(peer.ip()).into()
}

async fn route_tls<S: Stream>(gw: &Gateway, stream: S) -> Result<Routed, ConnError> {
    let (mut tls, negotiated) = match crate::tls::accept(stream, gw.tls_config(), gw.challenges()).await? {
        crate::tls::Accepted::Stream(tls, negotiated) => (tls, negotiated),
        crate::tls::Accepted::AcmeChallenge => return Err(ConnError::NoRoute(NoRoute::Closed)),
    };
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
            alpn: negotiated.alpn,
            vpce: None,
        });
    }
    let (sniffed, buf) = sniff::read_protocol(&mut tls, gw.limits().sniff_timeout).await;
    // Inside TLS, SSH is always allowed: the TLS layer already authenticated the gateway.
    let dest = route::by_sniff(&sniffed?, true).map_err(ConnError::NoRoute)?;
    Ok(Routed {
        dest,
        stream: Box::new(Prefixed::new(buf, tls)),
        tls: true,
        alpn: None,
        vpce: None,
    })
}
