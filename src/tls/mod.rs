//! The TLS stage: TLS 1.2+ only, ALPN `h2`, `http/1.1`, `ssh`. The ClientHello is read first
//! (`LazyConfigAcceptor`) so the SNI and ALPN are known before the handshake finishes, and a
//! pending ACME TLS-ALPN-01 validation is answered instead of a handshake.
//!
//! `certs` parses and tables certificates, `resolver` picks one by SNI and swaps them on reload,
//! `local_ca` mints for allowed hosts, `challenge` holds pending ACME answers. Nothing here knows
//! about tunnels: what may be minted is decided by whoever composes the gateway.

pub(crate) mod certs;
pub(crate) mod challenge;
pub mod local_ca;
pub(crate) mod resolver;

use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use challenge::{Challenges, ACME_TLS_ALPN};
use resolver::CertResolver;

pub(crate) const ALPN_H2: &[u8] = b"h2";
pub(crate) const ALPN_HTTP1: &[u8] = b"http/1.1";
pub(crate) const ALPN_SSH: &[u8] = b"ssh";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("{path} holds no DNS names (subjectAltName)")]
    NoNames { path: String },
    #[error("TLS set-up failed: {0}")]
    Setup(#[from] rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("acme-tls/1 offered but no ACME challenge is pending")]
    NoChallenge,
}

impl TlsError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Certificate { .. } | Self::NoNames { .. } | Self::Setup(_) => "setup",
            Self::Handshake(_) => "handshake",
            Self::NoChallenge => "no_acme_challenge",
        }
    }
}

/// The one place TLS versions are chosen: 1.3 and 1.2, aws-lc-rs, no client certificates.
fn builder() -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth())
}

/// The server configuration: our ALPN list, certificates from `resolver`.
pub(crate) fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = builder()?.with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_SSH.to_vec()];
    Ok(Arc::new(config))
}

/// What the handshake settled, for routing and the connection span.
#[derive(Debug, Clone, Default)]
pub(crate) struct Negotiated {
    pub(crate) sni: Option<String>,
    pub(crate) alpn: Option<Vec<u8>>,
}

/// What the TLS stage ended with.
pub(crate) enum Accepted<S> {
    Stream(Box<TlsStream<S>>, Negotiated),
    /// An ACME TLS-ALPN-01 validation was answered; the connection is done.
    AcmeChallenge,
}

/// Reads the ClientHello and finishes the handshake, or answers a pending TLS-ALPN-01 challenge
/// when the ClientHello offers `acme-tls/1`.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: Arc<ServerConfig>,
    challenges: &Challenges,
) -> Result<Accepted<S>, TlsError> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
        .await
        .map_err(|e| {
            crate::metrics::tls_handshake("error", "unknown", "none", 0.0);
            TlsError::Handshake(e)
        })?;
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let acme = hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
    if let (true, Some(name)) = (acme, sni.as_deref()) {
        return answer_challenge(start, challenges, name).await;
    }
    let started = std::time::Instant::now();
    let tls = match start.into_stream(config).await {
        Ok(tls) => tls,
        Err(e) => {
            crate::metrics::tls_handshake("error", "unknown", "none", 0.0);
            return Err(TlsError::Handshake(e));
        }
    };
    let conn = tls.get_ref().1;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "other",
    };
    let alpn_label = match alpn.as_deref() {
        Some(ALPN_H2) => "h2",
        Some(ALPN_HTTP1) => "http/1.1",
        Some(ALPN_SSH) => "ssh",
        _ => "none",
    };
    crate::metrics::tls_handshake("ok", version, alpn_label, started.elapsed().as_secs_f64());
    Ok(Accepted::Stream(Box::new(tls), Negotiated { sni, alpn }))
}

async fn answer_challenge<S: AsyncRead + AsyncWrite + Unpin>(
    start: tokio_rustls::StartHandshake<S>,
    challenges: &Challenges,
    name: &str,
) -> Result<Accepted<S>, TlsError> {
    let Some(config) = challenges.tls_alpn_config_or_fetch(name).await else {
        tracing::info!(
            name,
            "acme-tls/1 offered but no challenge is pending for this name"
        );
        return Err(TlsError::NoChallenge);
    };
    let mut tls = start.into_stream(config).await.map_err(TlsError::Handshake)?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    tracing::info!(name, "answered an ACME TLS-ALPN-01 validation");
    Ok(Accepted::AcmeChallenge)
}
