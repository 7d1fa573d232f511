//! The one place that knows the order of a connection's stages:
//! PROXY header → sniff → TLS → route → SSH or HTTP, everything before routing under one
//! deadline. The stages build one [`Routed`] value; nothing patches it afterwards.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{field, Instrument};

use crate::config::{ListenerConfig, ProxyMode};
use crate::gateway::{ClientSlot, Gateway};
use crate::io::{BoxStream, ClientAddr, Counted, Prefixed, Stream};
use crate::metrics;
use crate::passthrough::{self, Target};
use crate::proxy_protocol::{self, HeaderRead, ProxyError};
use crate::route::{self, Dest, NoRoute};
use crate::sniff::{self, Protocol, SniffError, Sniffed};
use crate::tls::{Accepted, Negotiated, TlsError};

#[derive(Debug, thiserror::Error)]
enum ConnError {
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
    PerClientLimit(crate::io::ClientKey),
}

impl ConnError {
    /// The pipeline stage that refused the connection (a bounded metric label).
    fn stage(&self) -> &'static str {
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

    fn reason(&self) -> &'static str {
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

/// How the bytes arrived.
#[derive(Debug)]
enum Transport {
    Plain,
    /// Terminated here, with what the handshake settled (SNI, ALPN).
    Tls(Negotiated),
    /// TLS for a `tls=passthrough` tunnel, left as it came.
    Passthrough(Target),
}

impl Routed {
    /// Writes what the stages decided into the connection's span, in one place.
    fn record(&self, span: &tracing::Span) {
        span.record("route", self.dest.as_str());
        if let Transport::Tls(Negotiated { sni, alpn }) = &self.transport {
            if let Some(sni) = sni {
                span.record("sni", sni.as_str());
            }
            if let Some(alpn) = alpn {
                span.record("alpn", String::from_utf8_lossy(alpn).as_ref());
            }
        }
        if let Transport::Passthrough(target) = &self.transport {
            span.record("sni", target.host.as_str());
        }
    }
}

/// A connection that reached a service, as the stages built it.
struct Routed {
    dest: Dest,
    transport: Transport,
    client: ClientAddr,
    stream: BoxStream,
}

/// How the stages before routing ended, when they did not refuse the connection.
enum Outcome<'g> {
    Routed(Routed, ClientSlot<'g>),
    /// An ACME TLS-ALPN-01 validation was answered: the connection's whole purpose, not a refusal.
    AcmeAnswered,
}

/// Handles one accepted connection to the end. Never panics on peer input; errors end up in one
/// outcome log line.
pub(crate) async fn handle(
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
            Ok(Outcome::Routed(r, _slot)) => {
                metrics::routed(&label, r.dest.as_str());
                serve(&gw, r, shutdown).await
            }
            Ok(Outcome::AcmeAnswered) => metrics::routed(&label, "acme"),
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
async fn serve(gw: &Gateway, r: Routed, shutdown: CancellationToken) {
    let route = r.dest.as_str();
    r.record(&tracing::Span::current());
    let _active = metrics::ActiveGuard::new(route);
    let started = std::time::Instant::now();
    let (stream, totals) = Counted::new(r.stream, route);
    let stream: BoxStream = Box::new(stream);
    let client = r.client;
    let outcome = match r.dest {
        Dest::Ssh => match crate::ssh::serve(gw.ssh(), stream, client, shutdown).await {
            Ok(()) => "closed".to_string(),
            Err(e) if e.is_disconnect() => "closed by the client".to_string(),
            Err(e) => e.to_string(),
        },
        Dest::Http(wire) => {
            let tls = matches!(r.transport, Transport::Tls(_));
            crate::http::serve(gw.http(), stream, client, (tls, wire), shutdown).await;
            "closed".to_string()
        }
        Dest::Passthrough => match r.transport {
            Transport::Passthrough(target) => {
                let open_timeout = gw.limits().tunnel_open_timeout;
                let served =
                    passthrough::serve(gw.directory().as_ref(), target, stream, &client, open_timeout);
                match served.await {
                    Ok(()) => "closed".to_string(),
                    Err(e) => e.to_string(),
                }
            }
            _ => "passthrough without a target".to_string(),
        },
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
/// Says who the client is, and whether a header was read.
async fn read_proxy(
    gw: &Gateway,
    listener: &ListenerConfig,
    mut tcp: TcpStream,
    peer: SocketAddr,
) -> Result<(Prefixed<TcpStream>, ClientAddr, bool), ConnError> {
    let direct = ClientAddr {
        client: peer,
        vpce: None,
    };
    if listener.proxy_protocol == ProxyMode::Off || !listener.trusts(peer.ip()) {
        return Ok((Prefixed::new(Vec::new(), tcp), direct, false));
    }
    let (read, rest) = proxy_protocol::read_header(&mut tcp, gw.limits().sniff_timeout).await;
    let read = read.inspect_err(|e| metrics::proxy_header("unknown", e.reason()))?;
    match read {
        HeaderRead::Header(h) => {
            metrics::proxy_header(if h.version == 1 { "v1" } else { "v2" }, "ok");
            if let Some(vpce) = &h.vpce_id {
                tracing::Span::current().record("vpce", vpce.as_str());
            }
            tracing::debug!(version = h.version, local = h.source.is_none(), "PROXY header");
            let client = ClientAddr {
                client: h.source.unwrap_or(peer),
                vpce: h.vpce_id,
            };
            Ok((Prefixed::new(rest, tcp), client, true))
        }
        HeaderRead::Closed => Err(ConnError::NoRoute(NoRoute::Closed)),
        HeaderRead::NoHeader if listener.proxy_protocol == ProxyMode::Required => {
            metrics::proxy_header("none", "missing");
            Err(ProxyError::Missing(peer.ip()).into())
        }
        HeaderRead::NoHeader => Ok((Prefixed::new(rest, tcp), direct, false)),
    }
}

async fn route_connection<'g>(
    gw: &'g Gateway,
    listener: &ListenerConfig,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<Outcome<'g>, ConnError> {
    let (mut stream, client, had_header) = read_proxy(gw, listener, tcp, peer).await?;
    let ip = client.client.ip();
    tracing::Span::current().record("client", field::display(client.client));
    let limits = gw.limits();
    let slot = gw
        .clients()
        .acquire(ip, limits.max_connections_per_client)
        .ok_or(ConnError::PerClientLimit(crate::io::ClientKey::of(ip)))?;
    // The sniff timer starts after the header: an NLB sends it with the client's first bytes.
    let (sniffed, buf) = sniff::read_protocol(&mut stream, limits.sniff_timeout).await;
    let sniffed = sniffed?;
    let stream = Prefixed::new(buf, stream);
    let (dest, transport, stream) = match sniffed {
        Sniffed::Found(Protocol::Tls) => {
            let tls = tokio::time::timeout(limits.tls_handshake_timeout, route_tls(gw, stream)).await;
            match tls.map_err(|_| ConnError::TlsTimeout)?? {
                Some(routed) => routed,
                None => return Ok(Outcome::AcmeAnswered),
            }
        }
        Sniffed::Found(Protocol::ProxyHeader) => {
            return Err(misplaced_proxy_header(listener, peer, had_header))
        }
        sniffed => {
            let dest = route::by_sniff(&sniffed, listener.plain_ssh).map_err(ConnError::NoRoute)?;
            let stream: BoxStream = Box::new(stream);
            (dest, Transport::Plain, stream)
        }
    };
    let routed = Routed {
        dest,
        transport,
        client,
        stream,
    };
    Ok(Outcome::Routed(routed, slot))
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

/// TLS, then routing by ALPN or by the decrypted bytes. `None`: an ACME validation was answered.
async fn route_tls<S: Stream>(
    gw: &Gateway,
    stream: S,
) -> Result<Option<(Dest, Transport, BoxStream)>, ConnError> {
    let hello = crate::tls::read_hello(stream).await?;
    // A tunnel's own TLS is decided from the ClientHello alone, before any certificate is chosen.
    if let (Some(sni), false) = (hello.sni(), hello.offers_acme()) {
        // Options still on their way are waited for, within the handshake's own deadline.
        let wait = crate::rules::SETTLE_WITHIN.min(gw.limits().tls_handshake_timeout / 2);
        if let Some(target) = passthrough::find(
            (gw.tunnels(), gw.directory().as_ref()),
            &gw.config().domain,
            sni,
            wait,
        )
        .await
        {
            let (raw, stream) = hello.into_raw();
            let stream: BoxStream = Box::new(Prefixed::new(raw, stream));
            return Ok(Some((Dest::Passthrough, Transport::Passthrough(target), stream)));
        }
    }
    let (mut tls, negotiated) = match crate::tls::accept(hello, gw.tls_config(), gw.challenges()).await? {
        Accepted::Stream(tls, negotiated) => (tls, negotiated),
        Accepted::AcmeChallenge => return Ok(None),
    };
    if let Some(dest) = route::by_alpn(negotiated.alpn.as_deref()) {
        let stream: BoxStream = tls;
        return Ok(Some((dest, Transport::Tls(negotiated), stream)));
    }
    let (sniffed, buf) = sniff::read_protocol(&mut tls, gw.limits().sniff_timeout).await;
    // Inside TLS, SSH is always allowed: the TLS layer already authenticated the gateway.
    let dest = route::by_sniff(&sniffed?, true).map_err(ConnError::NoRoute)?;
    let stream: BoxStream = Box::new(Prefixed::new(buf, tls));
    Ok(Some((dest, Transport::Tls(negotiated), stream)))
}
